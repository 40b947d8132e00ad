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

/** The first ```sh block of the "Rehearse a bad release" section. */
export function rehearsalScript(readme: string): string {
  const start = readme.indexOf('## Rehearse a bad release');
  const block = /```sh\n([\s\S]*?)```/.exec(readme.slice(start));
  if (start < 0 || !block) throw new Error('README.md has no block under "Rehearse a bad release"');
  return block[1]!;
}

/** Runs `script` in bash -euo pipefail in `cwd`; resolves to its exit code and its output. */
async function runScript(script: string, cwd: string, env: NodeJS.ProcessEnv): Promise<{ code: number; out: string }> {
  const shell = spawn('bash', ['-euo', 'pipefail', '-c', script], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  shell.stdout!.setEncoding('utf8').on('data', (t: string) => {
    out += t;
  });
  shell.stderr!.setEncoding('utf8').on('data', (t: string) => {
    out += t;
  });
  const [code] = await once(shell, 'exit');
  return { code: code as number, out };
}

// The README tour, pasted into a shell in a fresh directory with the server of `npm start` running
// there: only the ports differ (the server picks free ones, the script is told them).
describe('the README tour runs as a script', () => {
  let tmp: string;
  let server: ServerProcess | undefined;
  let env: NodeJS.ProcessEnv;
  let urls: { api: string; socket: string };
  const localize = (script: string) =>
    script.replaceAll('http://127.0.0.1:4000', urls.api).replaceAll('wss://localhost:4001/socket', urls.socket);

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
    env = { ...process.env, HOME: tmp, XDG_CONFIG_HOME: path.join(tmp, '.config') };
    delete env.FLEETHUB_DATA_DIR;
    // The tour's server: `npm start` in the clone, embedded PGlite in ./data, the dev PKI in ./data/pki.
    server = await startServerProcess({ cwd: tmp, env: { FLEETHUB_DATA_DIR: path.join(tmp, 'data') } });
    urls = { api: server.apiUrl, socket: server.socketUrl };
    const serverLog = server.output();
    // The banner prints the login line the README copies.
    assert.match(serverLog, /npx fleethub login --url http:\/\/127\.0\.0\.1:\d+ --email admin@fleethub\.local/);

    const { code, out } = await runScript(
      localize(tourScript(readFileSync(path.join(ROOT, 'README.md'), 'utf8'))),
      tmp,
      env,
    );
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

  test('then the bad-release rehearsal: the deployment pauses after its canary, sim-0004 rolled back', {
    timeout: 600_000,
  }, async () => {
    assert.ok(server, 'the tour ran');
    const { code, out } = await runScript(
      localize(rehearsalScript(readFileSync(path.join(ROOT, 'README.md'), 'utf8'))),
      tmp,
      env,
    );
    assert.equal(code, 0, `${out}\n--- server ---\n${server.output()}`);
    assert.match(out, /every device is online \(20\)/);
    assert.match(out, /^created deployment [0-9a-f-]{36} \(rehearsal\)$/m);
    assert.match(out, /^paused at stage 1.*\(4 succeeded, 1 failed, 15 not told\)/m);
    // Not a terminal: lines, no redraws.
    assert.doesNotMatch(out, /\x1b/);
    assert.match(out, /^sim-0004\s+phoenix\s+1\s+failed\b/m);
    assert.match(out, /^rolled back\s+1$/m);
    assert.match(out, /^succeeded\s+4$/m);
  });
});
