import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';

const CLI = path.resolve(import.meta.dirname, '../../server/cli/index.ts');

export interface ServerProcess {
  child: ChildProcess;
  /** `http://127.0.0.1:<port>` of the operator API. */
  apiUrl: string;
  /** `wss://localhost:<port>/socket` of the mutual-TLS device listener. */
  socketUrl: string;
  /** Everything the process printed (banner and log lines). */
  output(): string;
  /** `kill -9`: no drain, no shutdown hook, as a crash or the OOM killer. */
  kill(): Promise<void>;
}

export interface ServerProcessOptions {
  /** Default: `data` and `data/pki` in `cwd`, as `npm start` uses them. */
  dataDir?: string;
  certsDir?: string;
  /** Working directory of the server (default: this one). */
  cwd?: string;
  /** PostgreSQL URL; PGlite when absent. */
  databaseUrl?: string;
  nodeName?: string;
  env?: NodeJS.ProcessEnv;
}

/**
 * `fleethub serve` in its own process, on ephemeral ports, as an operator starts it: resolves
 * once the banner names the listeners. Only `kill()` or the test's end stops it.
 */
export async function startServerProcess(options: ServerProcessOptions): Promise<ServerProcess> {
  const args = [
    '--import',
    import.meta.resolve('tsx'), // resolved here: the server's cwd may be outside the repository
    CLI,
    'serve',
    ...(options.dataDir ? ['--data-dir', options.dataDir] : []),
    ...(options.certsDir ? ['--certs-dir', options.certsDir] : []),
    '--host',
    '127.0.0.1',
    '--api-port',
    '0',
    '--device-port',
    '0',
    '--keyauth-port',
    '-1',
    '--device-public-url',
    'https://localhost:0',
  ];
  if (options.nodeName) args.push('--node-name', options.nodeName);
  const env: NodeJS.ProcessEnv = { ...process.env, FLEETHUB_LOG_LEVEL: 'warn', ...options.env };
  if (options.databaseUrl) env.DATABASE_URL = options.databaseUrl;
  else delete env.DATABASE_URL;
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env, cwd: options.cwd });
  process.once('exit', () => child.kill('SIGKILL'));
  let text = '';
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
  const exited = once(child, 'exit');
  const banner = await new Promise<{ apiUrl: string; socketUrl: string }>((resolve, reject) => {
    const check = () => {
      const api = /operator API\s+(http:\/\/\S+?)\/api\/v1/.exec(text);
      const socket = /devices \(mTLS\)\s+(wss:\/\/\S+\/socket)/.exec(text);
      if (api && socket) {
        child.stdout!.off('data', check);
        resolve({ apiUrl: api[1]!, socketUrl: socket[1]! });
      }
    };
    child.stdout!.on('data', check);
    void exited.then(([code]) => reject(new Error(`fleethub serve exited (${code}) before it was ready:\n${text}`)));
  });
  return {
    child,
    ...banner,
    output: () => text,
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGKILL');
      await exited;
    },
  };
}
