/**
 * The compiled build, as `npm start` and the Docker image run it: `npm run build` emits dist/,
 * `bin/fleethub.js serve` starts from it with no TypeScript compiler (no tsx, no esbuild child
 * process), answers /readyz, admits a device join over mutual TLS and serves /metrics.
 *
 * The build goes to a package laid out as the clone is (dist/, bin/, package.json, node_modules)
 * in a temporary directory: rebuilding the clone's own dist/ would pull it from under other tests
 * that run its bins meanwhile (CI runs the suite on both databases at once).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import type { Socket } from 'phoenix';
import { disconnectSocket, joinChannel, openSocket } from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions, getTestPki } from '../helpers/pki.ts';
import { parseMetrics } from '../helpers/prometheus.ts';
import { startServerProcess, type ServerProcess } from '../helpers/server-process.ts';

const ROOT = path.resolve(import.meta.dirname, '../..');

/** Every process below `pid` (Linux /proc). */
function descendants(pid: number): number[] {
  const out: number[] = [];
  for (const task of readdirSync(`/proc/${pid}/task`)) {
    const file = `/proc/${pid}/task/${task}/children`;
    const children = existsSync(file) ? readFileSync(file, 'utf8').trim().split(/\s+/).filter(Boolean) : [];
    for (const child of children.map(Number)) out.push(child, ...descendants(child));
  }
  return out;
}

describe('the compiled build', () => {
  let server: ServerProcess;
  let dataDir: string;
  let pkg: string;
  let bin: string;
  let socket: Socket | undefined;

  before(
    async () => {
      pkg = mkdtempSync(path.join(os.tmpdir(), 'fleethub-build-'));
      await promisify(execFile)(process.execPath, [path.join(ROOT, 'scripts/build.js'), path.join(pkg, 'dist')], {
        cwd: ROOT,
      });
      cpSync(path.join(ROOT, 'bin'), path.join(pkg, 'bin'), { recursive: true });
      cpSync(path.join(ROOT, 'package.json'), path.join(pkg, 'package.json'));
      symlinkSync(path.join(ROOT, 'node_modules'), path.join(pkg, 'node_modules'));
      bin = path.join(pkg, 'bin/fleethub.js');
      dataDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-compiled-'));
      const pki = await getTestPki();
      server = await startServerProcess({ dataDir, certsDir: pki.dir, compiled: bin });
    },
    { timeout: 600_000 },
  );
  after(async () => {
    if (socket) await disconnectSocket(socket);
    await server?.kill();
    if (dataDir) rmSync(dataDir, { recursive: true, force: true });
    if (pkg) rmSync(pkg, { recursive: true, force: true });
  });

  test('dist/ holds the server, the migrations as JavaScript and the dashboard files', () => {
    for (const file of [
      'server/cli/index.js',
      'server/main.js',
      'device-client/cli.js',
      'server/web/static/index.html',
    ])
      assert.ok(existsSync(path.join(pkg, 'dist', file)), `dist/${file}`);
    const migrations = readdirSync(path.join(pkg, 'dist/migrations')).filter((f) => f.endsWith('.js'));
    const sources = readdirSync(path.join(ROOT, 'migrations')).filter((f) => f.endsWith('.ts'));
    assert.deepEqual(
      migrations.map((f) => f.replace(/\.js$/, '')),
      sources.map((f) => f.replace(/\.ts$/, '')),
    );
    // No specifier still names a .ts file: Node would fail to load it.
    assert.doesNotMatch(readFileSync(path.join(pkg, 'dist/server/main.js'), 'utf8'), /from '\.{1,2}\/[^']*\.ts'/);
  });

  test('runs without a TypeScript compiler: no tsx loaded, no esbuild process', () => {
    assert.ok(existsSync(bin));
    assert.doesNotMatch(readFileSync(bin, 'utf8'), /tsx/);
    const children = descendants(server.child.pid!);
    const commands = children.map((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' '));
    assert.deepEqual(commands, [], 'the server has no child processes');
    const maps = readFileSync(`/proc/${server.child.pid}/maps`, 'utf8');
    assert.doesNotMatch(maps, /esbuild/);
  });

  test('is ready, admits a device join over mutual TLS, and serves parseable metrics', async () => {
    const ready = await fetch(`${server.apiUrl}/readyz`);
    assert.equal(ready.status, 200);
    assert.equal((await fetch(`${server.apiUrl}/healthz`)).status, 200);

    socket = await openSocket(server.socketUrl, { tls: await deviceTlsOptions(await deviceCert('compiled-0001')) });
    const reply = await joinChannel(
      socket.channel('device:7a0c4c0e-3b7e-4a8e-9a39-0d1f6f2d2a11', { version: '1.0.0' }),
    );
    assert.ok(Array.isArray(reply.groups) || typeof reply === 'object');

    const res = await fetch(`${server.apiUrl}/metrics`);
    assert.equal(res.status, 200);
    const samples = parseMetrics(await res.text());
    const joins = samples.find((s) => s.name === 'fleethub_device_joins_total' && s.labels.protocol === 'phoenix');
    assert.equal(joins?.value, 1);
    assert.ok(samples.some((s) => s.name === 'process_resident_memory_bytes' && s.value > 0));
  });
});
