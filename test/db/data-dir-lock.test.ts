import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { DataDirInUseError, lockDataDir } from '../../server/db/data-dir-lock.ts';

// The lock of the embedded database's directory, against real processes: a holder in another
// process, SIGKILL, and pid files that lie (a pid reused by an unrelated process, a dead pid).
const LOCK_MODULE = pathToFileURL(path.resolve(import.meta.dirname, '../../server/db/data-dir-lock.ts')).href;

let dir: string;
const children: ChildProcess[] = [];

beforeEach(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-lock-'));
});
afterEach(() => {
  for (const child of children.splice(0))
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

/** Another process that takes the lock of `dir` and keeps it until killed. */
async function holder(): Promise<ChildProcess> {
  const code = `import(${JSON.stringify(LOCK_MODULE)}).then((m) => m.lockDataDir(${JSON.stringify(dir)})).then(() => { console.log('locked'); setInterval(() => {}, 60_000); });`;
  const child = spawn(process.execPath, ['--import', 'tsx', '--eval', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  const [chunk] = (await once(child.stdout!, 'data')) as [Buffer];
  assert.equal(chunk.toString().trim(), 'locked');
  return child;
}

/** A process that lives on while the test runs, standing for a pid the system handed to someone else. */
function unrelatedProcess(): ChildProcess {
  const child = spawn('sleep', ['60'], { stdio: 'ignore' });
  children.push(child);
  return child;
}

async function deadPid(): Promise<number> {
  const child = spawn('true', [], { stdio: 'ignore' });
  await once(child, 'exit');
  return child.pid!;
}

const lockFile = () => path.join(dir, 'fleethub.lock');

describe('data directory lock', () => {
  test('a directory held by a live process is refused, naming that process, even when the pid file names a dead one', async () => {
    const held = await holder();
    assert.equal(Number(readFileSync(lockFile(), 'utf8')), held.pid);
    // A pid file cannot be trusted: here it names a process that is gone.
    writeFileSync(lockFile(), `${await deadPid()}\n`);
    await assert.rejects(lockDataDir(dir), (err: unknown) => {
      assert.ok(err instanceof DataDirInUseError);
      assert.equal(err.pid, held.pid, 'the holder answers with its own pid');
      assert.match(err.message, new RegExp(`in use by process ${held.pid}\\b.*Stop that process first`));
      return true;
    });
  });

  test('a pid file naming a live unrelated process (a reused pid) does not keep the directory locked', async () => {
    const other = unrelatedProcess();
    writeFileSync(lockFile(), `${other.pid}\n`);
    const release = await lockDataDir(dir);
    assert.equal(Number(readFileSync(lockFile(), 'utf8')), process.pid, 'the pid file now names this process');
    await release();
  });

  test('the lock is free the moment its holder is killed with SIGKILL', async () => {
    const held = await holder();
    await assert.rejects(lockDataDir(dir), DataDirInUseError);
    held.kill('SIGKILL');
    await once(held, 'exit');
    const release = await lockDataDir(dir);
    await release();
  });

  test('a second lock in the same process is refused, and released locks can be taken again', async () => {
    const release = await lockDataDir(dir);
    await assert.rejects(
      lockDataDir(dir),
      (err: unknown) => err instanceof DataDirInUseError && err.pid === process.pid,
    );
    await release();
    await release();
    assert.throws(() => readFileSync(lockFile()), { code: 'ENOENT' }, 'release removes the pid file');
    const again = await lockDataDir(dir);
    await again();
  });
});
