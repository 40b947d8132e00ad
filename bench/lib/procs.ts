/**
 * Child processes of a bench run: the fleethub server, the floor server, the load-generator
 * workers and a Mosquitto broker with mutual TLS. Every one is tracked so the run can stop
 * them all (by pid) whatever happens.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Rpc } from './ipc.ts';

const children = new Set<ChildProcess>();

/** Kills every child this run started (each by its own pid). */
export function killAll(): void {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  children.clear();
}

function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/** Forks a TypeScript entry point (through tsx) with an IPC channel; resolves with its ready message. */
export async function forkTs<Ready>(
  name: string,
  script: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; nodeFlags?: string[] } = {},
): Promise<{ rpc: Rpc; ready: Ready; child: ChildProcess }> {
  const child = track(
    spawn(process.execPath, [...(opts.nodeFlags ?? []), '--import', 'tsx', script, ...args], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      env: { ...process.env, ...opts.env },
    }),
  );
  const ready = await new Promise<Ready>((resolve, reject) => {
    const onMessage = (message: unknown) => {
      if ((message as { ready?: boolean })?.ready) {
        child.off('exit', onExit);
        child.off('message', onMessage);
        resolve(message as Ready);
      }
    };
    const onExit = (code: number | null) => reject(new Error(`${name} exited with ${code} before it was ready`));
    child.on('message', onMessage);
    child.once('exit', onExit);
  });
  return { rpc: new Rpc(child, name), ready, child };
}

/** Stops a child politely through its `stop` call, then by signal. */
export async function stopChild(rpc: Rpc, child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await Promise.race([rpc.call('stop').catch(() => undefined), new Promise((r) => setTimeout(r, 20_000))]);
  await Promise.race([exited, new Promise((r) => setTimeout(r, 5_000))]);
  if (child.exitCode === null) child.kill('SIGKILL');
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}

/**
 * A second Mosquitto on a free loopback port with mutual TLS from the dev PKI: server cert,
 * client certificates verified against root + signer CA, TLS 1.3 as on fleethub's device port.
 */
export async function startMosquitto(pkiDir: string): Promise<{ port: number; child: ChildProcess }> {
  // Mosquitto started as root drops to its own user, which cannot read a checkout inside a
  // private (0700) directory: its configuration and the copies of the PKI go to /tmp.
  const workDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-bench-mosquitto-'));
  chmodSync(workDir, 0o755);
  process.once('exit', () => rmSync(workDir, { recursive: true, force: true }));
  const port = await freePort();
  const conf = path.join(workDir, 'mosquitto.conf');
  const caFile = path.join(workDir, 'ca.pem');
  writeFileSync(
    caFile,
    readFileSync(path.join(pkiDir, 'root-ca.pem'), 'utf8') + readFileSync(path.join(pkiDir, 'signer-ca.pem'), 'utf8'),
  );
  // Nor the 0600 dev key: copies, readable.
  const keyFile = path.join(workDir, 'server.key');
  writeFileSync(keyFile, readFileSync(path.join(pkiDir, 'server.key')), { mode: 0o644 });
  const certFile = path.join(workDir, 'server.pem');
  writeFileSync(certFile, readFileSync(path.join(pkiDir, 'server.pem')), { mode: 0o644 });
  writeFileSync(
    conf,
    [
      'per_listener_settings false',
      'persistence false',
      'log_dest none',
      'log_type error',
      'allow_anonymous true',
      'max_connections -1',
      `listener ${port} 127.0.0.1`,
      `cafile ${caFile}`,
      `certfile ${certFile}`,
      `keyfile ${keyFile}`,
      'require_certificate true',
      'tls_version tlsv1.3',
      '',
    ].join('\n'),
  );
  const child = track(spawn('/usr/sbin/mosquitto', ['-c', conf], { stdio: ['ignore', 'ignore', 'inherit'] }));
  // Ready when the port accepts.
  const deadline = Date.now() + 10_000;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) break;
    if (child.exitCode !== null) throw new Error(`mosquitto exited with ${child.exitCode}; see its stderr above`);
    if (Date.now() > deadline) throw new Error('mosquitto did not open its port within 10 s');
    await new Promise((r) => setTimeout(r, 100));
  }
  return { port, child };
}
