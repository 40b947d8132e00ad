import { createHash } from 'node:crypto';
import { readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';

/** PGlite is one process's database: a second process opening the same files would corrupt them. */
export class DataDirInUseError extends Error {
  readonly code = 'DATA_DIR_IN_USE';
  constructor(
    readonly dir: string,
    /** The holder's pid as it told us (or as its pid file says); undefined when neither could be read. */
    readonly pid: number | undefined,
  ) {
    super(
      `the embedded database in ${dir} is in use by ${pid === undefined ? 'another process' : `process ${pid}`} (a running fleethub server?). ` +
        'Stop that process first, or do this through the running server: `fleethub login`, then the REST API or CLI commands.',
    );
    this.name = 'DataDirInUseError';
  }
}

/**
 * Where the lock lives. On Linux an abstract Unix socket named after the directory's real path:
 * the kernel frees the name the moment the holder dies, however it dies, and binding is atomic.
 * Elsewhere a socket file in the directory, which a dead holder leaves behind (see `listenOnce`).
 */
export function lockAddress(dir: string): string {
  if (process.platform === 'linux') return `\0fleethub-${createHash('sha256').update(realpathSync(dir)).digest('hex')}`;
  return path.join(dir, 'fleethub.lock.sock');
}

/**
 * Takes the data directory for this process by listening on its lock socket (`lockAddress`);
 * the lock is the socket, never the pid. `<dir>/fleethub.lock` records our pid for the error
 * message of whoever comes next. Throws `DataDirInUseError` while another process holds it.
 * Resolves with the release function.
 */
export async function lockDataDir(dir: string): Promise<() => Promise<void>> {
  const address = lockAddress(dir);
  const pidFile = path.join(dir, 'fleethub.lock');
  const server = net.createServer((socket) => {
    // Whoever asks learns who holds the directory.
    socket.on('error', () => undefined);
    socket.end(`${process.pid}\n`);
  });
  server.on('error', () => undefined);
  if (!(await listenOnce(server, address))) {
    throw new DataDirInUseError(dir, (await holderPid(address)) ?? pidFromFile(pidFile));
  }
  // The lock must not keep the process alive on its own.
  server.unref();
  writeFileSync(pidFile, `${process.pid}\n`);
  let released: Promise<void> | undefined;
  return () =>
    (released ??= new Promise<void>((resolve) => {
      rmSync(pidFile, { force: true });
      server.close(() => resolve());
    }));
}

/**
 * Listens on `address`; false when another process listens there. A socket file left by a dead
 * holder (not on Linux) refuses connections: it is removed and the bind tried once more.
 */
async function listenOnce(server: net.Server, address: string): Promise<boolean> {
  for (let attempt = 0; ; attempt++) {
    const err = await new Promise<NodeJS.ErrnoException | undefined>((resolve) => {
      const onError = (e: NodeJS.ErrnoException) => resolve(e);
      server.once('error', onError);
      server.listen({ path: address, exclusive: true }, () => {
        server.off('error', onError);
        resolve(undefined);
      });
    });
    if (!err) return true;
    if (err.code !== 'EADDRINUSE') throw err;
    if (address.startsWith('\0') || attempt > 0 || (await holderAnswers(address))) return false;
    rmSync(address, { force: true });
  }
}

function holderAnswers(address: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ path: address });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** Asks the holder for its pid (it answers and hangs up); undefined when it does not answer in time. */
function holderPid(address: string): Promise<number | undefined> {
  return new Promise((resolve) => {
    let text = '';
    const socket = net.connect({ path: address });
    const done = (pid: number | undefined) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(pid);
    };
    const timer = setTimeout(() => done(undefined), 1000);
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => (text += chunk));
    socket.once('end', () => done(parsePid(text)));
    socket.once('error', () => done(undefined));
  });
}

function pidFromFile(file: string): number | undefined {
  try {
    return parsePid(readFileSync(file, 'utf8'));
  } catch {
    return undefined;
  }
}

function parsePid(text: string): number | undefined {
  const pid = Number.parseInt(text, 10);
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}
