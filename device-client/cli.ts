/**
 * `fleethub-device connect` runs one device; `fleethub-device simulate` runs many in one process.
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { DeviceClient, ExecInstaller } from './index.ts';
import { Simulation, simulatorProtocols, summaryTable } from './simulator.ts';
// Each import registers one more `--protocol` for `simulate`.
import './simulators/grisp.ts';
import './simulators/wifidogx.ts';
import './simulators/main-server.ts';
import './simulators/keyauth.ts';

const USAGE = `Usage:
  fleethub-device connect --cert cert.pem --key key.pem --ca ca.pem --url wss://host:4001/socket
                          [--firmware-uuid UUID --version V] [--slots DIR] [--platform P] [--architecture A]
                          [--product P] [--signing-key pub.pem ...] [--require-signature] [--install-command CMD]
  fleethub-device simulate --count N --url wss://host:4001/socket [--certs DIR] [--pki DIR] [--slots DIR]
                          [--protocol ${simulatorProtocols().join('|')}] [--firmware-uuid UUID --version V]
                          [--fail-download-rate R] [--corrupt-rate R] [--drop-connection-rate R]
                          [--reject-install-rate R] [--slow-link KBPS] [--stagger-ms MS] [--seed N]
                          [--duration S] [--until-version V] [--json]

Rates are probabilities per update (0..1). --drop-connection-rate cuts the download connection
mid-stream once (the device resumes with Range). simulate exits on Ctrl-C, after --duration, or
once every device runs --until-version or failed updating to it; it then prints a summary table.`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (command === 'connect') return await connect(rest);
    if (command === 'simulate') return await simulate(rest);
    process.stderr.write(`${USAGE}\n`);
    return command === '--help' || command === '-h' ? 0 : 2;
  } catch (err) {
    process.stderr.write(`error: ${(err as Error).message}\n`);
    return 1;
  }
}

async function connect(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      cert: { type: 'string' },
      key: { type: 'string' },
      ca: { type: 'string' },
      url: { type: 'string' },
      'firmware-uuid': { type: 'string' },
      version: { type: 'string' },
      slots: { type: 'string' },
      platform: { type: 'string' },
      architecture: { type: 'string' },
      product: { type: 'string' },
      'signing-key': { type: 'string', multiple: true },
      'require-signature': { type: 'boolean' },
      'install-command': { type: 'string' },
    },
  });
  for (const flag of ['cert', 'key', 'ca', 'url'] as const)
    if (!values[flag]) throw new Error(`--${flag} is required\n\n${USAGE}`);
  if (Boolean(values['firmware-uuid']) !== Boolean(values.version))
    throw new Error('--firmware-uuid and --version go together');
  const slots = path.resolve(values.slots ?? path.join(os.homedir(), '.fleethub-device'));
  const client = new DeviceClient({
    url: values.url!,
    tls: {
      cert: readFileSync(values.cert!, 'utf8'),
      key: readFileSync(values.key!, 'utf8'),
      ca: readFileSync(values.ca!, 'utf8'),
    },
    stateDir: slots,
    installer: values['install-command']
      ? new ExecInstaller({ command: values['install-command'], stateDir: slots })
      : undefined,
    firmware: values['firmware-uuid'] ? { uuid: values['firmware-uuid'], version: values.version! } : undefined,
    metadata: { platform: values.platform, architecture: values.architecture, product: values.product },
    signingKeys: (values['signing-key'] ?? []).map((f) => readFileSync(f, 'utf8')),
    requireSignature: values['require-signature'],
  });
  const log = (line: string) => process.stderr.write(`${new Date().toISOString()} ${line}\n`);
  const bar = progressBar();
  client.on('connected', () => log(`connected to ${values.url}`));
  client.on('disconnected', () => log('disconnected (reconnecting with backoff)'));
  client.on('joined', ({ topic, groups }) => log(`joined ${topic}; groups: ${groups.join(', ') || '(none)'}`));
  client.on('join_error', ({ topic, reason }) => log(`join ${topic} refused: ${reason}`));
  client.on('group_joined', (topic) => log(`joined ${topic}`));
  client.on('group_left', (topic) => log(`left ${topic}`));
  client.on('update_ignored', ({ version, reason }) => log(`ignored update to ${version} (${reason})`));
  client.on('update_begin', ({ version, size }) => log(`updating to ${version} (${size} bytes)`));
  client.on('progress', ({ bytes, total }) => bar.update(bytes, total));
  client.on('url_refused', ({ refresh }) => {
    bar.done();
    log(`download URL refused (403); rejoining for a fresh one (${refresh})`);
  });
  client.on('update_finished', ({ version }) => {
    bar.done();
    log(`installed ${version}; rebooting`);
  });
  client.on('update_error', ({ version, errors }) => {
    bar.done();
    log(`update to ${version} failed: ${errors.join('; ')}`);
  });
  client.on('rebooted', ({ uuid, version }) => log(`running ${version} (${uuid})`));
  client.on('warning', (message) => log(`warning: ${message}`));
  await client.start();
  log(`running ${client.running!.version} (${client.running!.uuid}); slots in ${slots}`);
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  await client.stop();
  return 0;
}

async function simulate(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      count: { type: 'string' },
      certs: { type: 'string' },
      pki: { type: 'string' },
      url: { type: 'string' },
      slots: { type: 'string' },
      protocol: { type: 'string', default: 'phoenix' },
      'serial-prefix': { type: 'string' },
      'firmware-uuid': { type: 'string' },
      version: { type: 'string' },
      'fail-download-rate': { type: 'string' },
      'corrupt-rate': { type: 'string' },
      'drop-connection-rate': { type: 'string' },
      'reject-install-rate': { type: 'string' },
      'slow-link': { type: 'string' },
      'stagger-ms': { type: 'string' },
      seed: { type: 'string' },
      duration: { type: 'string' },
      'until-version': { type: 'string' },
      json: { type: 'boolean' },
    },
  });
  for (const flag of ['count', 'url'] as const) if (!values[flag]) throw new Error(`--${flag} is required\n\n${USAGE}`);
  // Certificates are kept per device under --certs (default ./sim-certs) and issued through --pki when missing.
  values.certs ??= 'sim-certs';
  const count = int('count', values.count!, 1);
  const rate = (flag: string, v: string | undefined) => {
    if (v === undefined) return 0;
    const n = Number(v);
    if (!(n >= 0 && n <= 1)) throw new Error(`--${flag} must be a probability from 0 to 1, got ${JSON.stringify(v)}`);
    return n;
  };
  const sim = new Simulation({
    protocol: values.protocol,
    count,
    url: values.url!,
    certsDir: path.resolve(values.certs!),
    pkiDir: values.pki ? path.resolve(values.pki) : undefined,
    slotsDir: path.resolve(values.slots ?? path.join(values.certs!, '..', 'slots')),
    serialPrefix: values['serial-prefix'],
    firmware: values['firmware-uuid']
      ? { uuid: values['firmware-uuid'], version: values.version ?? '0.0.1' }
      : undefined,
    faults: {
      failDownload: rate('fail-download-rate', values['fail-download-rate']),
      corrupt: rate('corrupt-rate', values['corrupt-rate']),
      dropConnection: rate('drop-connection-rate', values['drop-connection-rate']),
      rejectInstall: rate('reject-install-rate', values['reject-install-rate']),
      slowLinkKbps: values['slow-link'] ? int('slow-link', values['slow-link'], 1) : 0,
    },
    staggerMs: values['stagger-ms'] ? int('stagger-ms', values['stagger-ms'], 0) : 10,
    seed: values.seed ? int('seed', values.seed, 0) : 1,
  });
  const live = process.stderr.isTTY;
  const line = () => {
    const s = sim.summary();
    return `devices ${s.devices}  connected ${s.connected}  joined ${s.joined}  updating ${s.updating}  succeeded ${s.succeeded}  failed ${s.failed}`;
  };
  const ticker = setInterval(
    () => process.stderr.write(live ? `\r${line()}\u001b[K` : `${line()}\n`),
    live ? 250 : 5000,
  );
  ticker.unref();

  const untilVersion = values['until-version'];
  const done = new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
    if (values.duration) setTimeout(resolve, int('duration', values.duration, 1) * 1000).unref();
    if (untilVersion) {
      // Every device either runs the version or failed its last attempt at it.
      const settled = () =>
        sim.tallies.length === count &&
        sim.tallies.every((t) => t.updating === null && (t.succeeded > 0 || t.failed > 0));
      sim.on('change', () => {
        if (settled()) resolve();
      });
    }
  });
  await sim.start();
  await done;
  clearInterval(ticker);
  if (live) process.stderr.write(`\r${line()}\u001b[K\n`);
  const summary = sim.summary();
  await sim.stop();
  process.stdout.write(
    values.json ? `${JSON.stringify({ summary, devices: sim.tallies }, null, 2)}\n` : summaryTable(summary),
  );
  return 0;
}

/** A one-line progress bar on stderr when it is a terminal; silent otherwise. */
function progressBar() {
  const tty = process.stderr.isTTY;
  let last = 0;
  let shown = false;
  return {
    update(bytes: number, total: number) {
      if (!tty) return;
      const now = Date.now();
      if (now - last < 100 && bytes < total) return;
      last = now;
      shown = true;
      const pct = total ? bytes / total : 1;
      const width = 30;
      const filled = Math.round(pct * width);
      process.stderr.write(
        `\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(pct * 100).toFixed(1).padStart(5)}%  ${mib(bytes)}/${mib(total)} MiB\u001b[K`,
      );
    },
    done() {
      if (shown) process.stderr.write('\n');
      shown = false;
    },
  };
}

function mib(n: number): string {
  return (n / 1024 / 1024).toFixed(1);
}

function int(flag: string, value: string, min: number): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < min)
    throw new Error(`--${flag} must be an integer ≥ ${min}, got ${JSON.stringify(value)}`);
  return n;
}

// Runs when started as the program (bin/fleethub-device.js or `tsx device-client/cli.ts`), not when imported.
if (process.argv[1] && /(fleethub-device(\.js)?|device-client[\\/]cli\.ts)$/.test(process.argv[1]))
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      process.stderr.write(`${(err as Error).message}\n`);
      process.exitCode = 1;
    },
  );
