import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type ServerProcess, startServerProcess } from '../helpers/server-process.ts';

const ROOT = path.resolve(import.meta.dirname, '../..');

/** The tour's second-terminal block: the first ```sh block after "In another". */
export function tourScript(readme: string): string {
  const start = readme.indexOf('In another');
  const block = /```sh\n([\s\S]*?)```/.exec(readme.slice(start));
  if (start < 0 || !block) throw new Error('README.md has no tour block after "In another"');
  return block[1]!;
}

// The README tour, pasted into a shell in a fresh directory with the server of `npm start` running
// there: only the ports differ (the server picks free ones, the script is told them).
describe('the README tour runs as a script', () => {
  let tmp: string;
  let server: ServerProcess | undefined;

  before(() => {
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-tour-'));
    // `npx fleethub` finds this package's bins as it would in a clone.
    mkdirSync(path.join(tmp, 'node_modules/.bin'), { recursive: true });
    for (const bin of ['fleethub', 'fleethub-device'])
      symlinkSync(path.join(ROOT, 'bin', `${bin}.js`), path.join(tmp, 'node_modules/.bin', bin));
  });
  after(async () => {
    await server?.kill();
    rmSync(tmp, { recursive: true, force: true });
  });

  test('login, 20 simulated devices, a group by pattern, an upload, a retarget: every command exits 0', {
    timeout: 900_000,
  }, async () => {
    const env: NodeJS.ProcessEnv = { ...process.env, HOME: tmp, XDG_CONFIG_HOME: path.join(tmp, '.config') };
    delete env.FLEETHUB_DATA_DIR;
    // The tour's server: `npm start` in the clone, embedded PGlite in ./data, the dev PKI in ./data/pki.
    server = await startServerProcess({ cwd: tmp, env: { FLEETHUB_DATA_DIR: path.join(tmp, 'data') } });
    const urls = { api: server.apiUrl, socket: server.socketUrl };
    const serverLog = server.output();
    // The banner prints the login line the README copies.
    assert.match(serverLog, /npx fleethub login --url http:\/\/127\.0\.0\.1:\d+ --email admin@fleethub\.local/);

    const script = tourScript(readFileSync(path.join(ROOT, 'README.md'), 'utf8'))
      .replaceAll('http://127.0.0.1:4000', urls.api)
      .replaceAll('wss://localhost:4001/socket', urls.socket);
    const shell = spawn('bash', ['-euo', 'pipefail', '-c', script], {
      cwd: tmp,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    shell.stdout!.setEncoding('utf8').on('data', (t: string) => {
      out += t;
    });
    shell.stderr!.setEncoding('utf8').on('data', (t: string) => {
      out += t;
    });
    const [code] = await once(shell, 'exit');
    assert.equal(code, 0, `${out}\n--- server ---\n${server.output()}`);

    assert.match(out, /logged in to .* as admin@fleethub\.local \(admin\)/);
    assert.match(out, /every device is online \(20\)/);
    assert.match(out, /^added 20 device\(s\) to beta$/m);
    assert.match(out, /group beta now targets 2\.0\.0/);
    assert.match(out, /every device of beta runs 2\.0\.0 \(20\)/);
    // The simulator's table came last, after `wait`, not glued onto the CLI's output.
    assert.match(out, /^succeeded\s+20$/m);
    assert.match(out, /^failed\s+0$/m);
    const simLog = readFileSync(path.join(tmp, 'data/sim.log'), 'utf8');
    assert.doesNotMatch(simLog, /\r|\x1b/, 'not a terminal: plain lines');
    assert.match(simLog, /devices 20 {2}connected 20 {2}joined 20/);
    // Scratch files are under data/, nothing in the working directory.
    assert.match(readFileSync(path.join(tmp, 'data/sim-summary.txt'), 'utf8'), /^devices\s+20$/m);
  });
});
