/**
 * `fleethub-device connect` runs one device; `fleethub-device simulate` runs many in one process.
 * The commander tree below is the only source of their options and help (docs/cli.md).
 */
import { randomUUID, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Command, Option } from 'commander';
import {
  act,
  type CliContext,
  CliError,
  type CliIo,
  finishTree,
  packageVersion,
  processIo,
  runProgram,
} from '../shared/cli.ts';
import { DeviceClient, ExecInstaller } from './index.ts';
import { formatConnectionFailure } from './connection-failure.ts';
import {
  BAD_MODES,
  type BadMode,
  Simulation,
  simulatorProtocols,
  summaryTable,
  type DeviceTally,
} from './simulator.ts';
// Each import registers one more `--protocol` for `simulate`.
import './simulators/grisp.ts';
import './simulators/wifidogx.ts';
import './simulators/main-server.ts';
import './simulators/keyauth.ts';

/** The firmware a device runs on its first start when neither --firmware-uuid nor --version says. */
export const DEFAULT_FIRMWARE_VERSION = '0.0.1';

/** The data directory, as for the server: FLEETHUB_DATA_DIR, else ./data. */
function dataDir(env: NodeJS.ProcessEnv): string {
  return path.resolve(env.FLEETHUB_DATA_DIR || 'data');
}

/** The whole `fleethub-device` command tree, writing to `ctx.io`. */
export function buildDeviceProgram(ctx: CliContext): Command {
  const program = new Command('fleethub-device')
    .description('a fleethub device: one with its own certificate (connect), or many simulated ones (simulate)')
    .version(packageVersion(import.meta.dirname), '-V, --version', 'print the version')
    .helpOption('-h, --help', 'show help')
    .enablePositionalOptions()
    .addHelpText('after', '\nExit codes: 0 ok, 1 failure, 2 usage error. docs/cli.md');
  const collect = (v: string, prev: string[] = []) => [...prev, v];
  act<ConnectFlags>(
    program
      .command('connect')
      .description('run one device until Ctrl-C: connects, reconnects, installs updates (A/B slots or a command)')
      .requiredOption('--url <url>', 'the device socket, wss://host:4001/socket')
      .requiredOption('--cert <cert.pem>', 'the device certificate')
      .requiredOption('--key <key.pem>', "the certificate's private key")
      .requiredOption('--ca <ca.pem>', "the CA that signed the server's certificate")
      .option(
        '--state-dir <dir>',
        'slots and running firmware (default <data-dir>/device-state/<certificate CN>; data-dir: FLEETHUB_DATA_DIR or ./data)',
      )
      .option(
        '--firmware-uuid <uuid>',
        'first start only: the uuid of the running firmware (default: a new random uuid)',
      )
      .option('--version <version>', `first start only: its version (default ${DEFAULT_FIRMWARE_VERSION})`)
      .option('--platform <platform>', 'join metadata for firmware the server does not know')
      .option('--architecture <arch>', 'join metadata for firmware the server does not know')
      .option('--product <product>', 'join metadata: the product')
      .option(
        '--signing-key <pub.pem>',
        'ed25519 public key firmware signatures must verify against; repeatable',
        collect,
      )
      .option('--require-signature', 'refuse unsigned firmware')
      .option('--install-command <cmd>', 'install with this command instead of the A/B slots'),
    ctx,
    (o) => connect(o, ctx.io),
  );
  act<SimulateFlags>(
    program
      .command('simulate')
      .description(
        'run N simulated devices in one process with a live summary line on stderr, then a summary table (Ctrl-C, --duration, --until-version or --until-quiet ends it)',
      )
      .requiredOption('--count <n>', 'how many devices')
      .requiredOption('--url <url>', "the server's device endpoint (wss://host:4001/socket for phoenix)")
      .option('--certs <dir>', 'per-device certificates, <dir>/<serial>/{cert,key,ca}.pem', 'sim-certs')
      .option('--pki <dir>', 'development PKI to issue missing certificates from (fleethub certs init)')
      .option('--state-dir <dir>', "each device's slots, <dir>/<serial> (default: slots next to --certs)")
      .addOption(
        new Option('--protocol <name>', 'the protocol the devices speak')
          .choices(simulatorProtocols())
          .default('phoenix'),
      )
      .option('--serial-prefix <prefix>', 'device serials are <prefix>-0000, <prefix>-0001, ... (default sim)')
      .option('--firmware-uuid <uuid>', 'first start: the uuid of the running firmware (default: a new random uuid)')
      .option('--version <version>', `first start: its version (default ${DEFAULT_FIRMWARE_VERSION})`)
      .option('--fail-download-rate <p>', 'probability per update that the download fails (0..1)')
      .option('--corrupt-rate <p>', 'probability per update that the image arrives corrupted (0..1)')
      .option('--drop-connection-rate <p>', 'probability per update that the download is cut once and resumed (0..1)')
      .option('--reject-install-rate <p>', 'probability per update that the installer rejects the image (0..1)')
      .option('--slow-link <kbps>', 'throttle every download to this many kbit/s')
      .option(
        '--bad-version <version>',
        'rehearse a bad release: devices told to install this version misbehave (--bad-mode)',
      )
      .addOption(
        new Option(
          '--bad-mode <mode>',
          'rollback: install, then come back on the old firmware; fail: report an error; hang: go silent mid-download',
        )
          .choices([...BAD_MODES])
          .default('fail'),
      )
      .option(
        '--bad-fraction <f>',
        'only this fraction of the devices misbehave (0..1, default 1), by index: device i when floor((i+1)*f) > floor(i*f)',
      )
      .option('--stagger-ms <ms>', 'pause between two device starts (default 10)')
      .option('--seed <n>', 'seed of the fault choices (default 1)')
      .option('--duration <seconds>', 'stop after this long')
      .option(
        '--until-version <version>',
        'stop once every device has rejoined running this version (the server has then recorded the update as succeeded) or failed updating to it',
      )
      .option(
        '--until-quiet <seconds>',
        'stop once an update has begun and then no device changed for this long (a rollout that stopped or ended)',
      )
      .option('--json', 'print the summary and every device as JSON'),
    ctx,
    (o) => simulate(o, ctx.io),
  );
  return finishTree(program, ctx.io);
}

/** Runs `fleethub-device <argv>`; resolves to the exit code. */
export async function main(argv: string[], io: CliIo = processIo): Promise<number> {
  const ctx: CliContext = { io, exitCode: 0 };
  return runProgram(buildDeviceProgram(ctx), ctx, argv);
}

interface ConnectFlags {
  url: string;
  cert: string;
  key: string;
  ca: string;
  stateDir?: string;
  firmwareUuid?: string;
  version?: string;
  platform?: string;
  architecture?: string;
  product?: string;
  signingKey?: string[];
  requireSignature?: boolean;
  installCommand?: string;
}

function readPem(file: string, what: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch (err) {
    throw new CliError(
      `cannot read the ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  }
}

/** The certificate's CN, which names the device (its serial). */
function commonName(certPem: string): string {
  try {
    const cn = /(?:^|\n)CN=([^\n]+)/.exec(new X509Certificate(certPem).subject)?.[1];
    if (cn) return cn;
  } catch {
    // fall through
  }
  throw new CliError('the certificate has no readable CN; pass --state-dir');
}

async function connect(o: ConnectFlags, io: CliIo): Promise<number> {
  const tls = { cert: readPem(o.cert, 'certificate'), key: readPem(o.key, 'key'), ca: readPem(o.ca, 'CA certificate') };
  const stateDir = path.resolve(
    o.stateDir ?? path.join(dataDir(io.env), 'device-state', commonName(tls.cert).replace(/[^A-Za-z0-9_.-]/g, '_')),
  );
  const client = new DeviceClient({
    url: o.url,
    tls,
    stateDir,
    installer: o.installCommand ? new ExecInstaller({ command: o.installCommand, stateDir }) : undefined,
    firmware: { uuid: o.firmwareUuid ?? randomUUID(), version: o.version ?? DEFAULT_FIRMWARE_VERSION },
    metadata: { platform: o.platform, architecture: o.architecture, product: o.product },
    signingKeys: (o.signingKey ?? []).map((f) => readPem(f, 'signing key')),
    requireSignature: o.requireSignature,
  });
  const log = (line: string) => io.err(`${new Date().toISOString()} ${line}\n`);
  const bar = progressBar();
  // A failure that repeats (every reconnect) is printed when its reason changes, with a count after.
  let lastFailure = '';
  let repeats = 0;
  client.on('connected', () => {
    if (repeats > 1) log(`(${repeats} attempts failed: ${lastFailure})`);
    lastFailure = '';
    repeats = 0;
    log(`connected to ${o.url}`);
  });
  client.on('connect_error', (failure) => {
    const message = formatConnectionFailure(failure);
    repeats = message === lastFailure ? repeats + 1 : 1;
    if (repeats === 1) log(`cannot connect to ${o.url}: ${message} (retrying with backoff)`);
    lastFailure = message;
  });
  let stopping = false;
  client.on('disconnected', () => {
    if (!lastFailure && !stopping) log('disconnected (reconnecting with backoff)');
  });
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
  log(`running ${client.running!.version} (${client.running!.uuid}); state in ${stateDir}`);
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
    io.signal?.addEventListener('abort', () => resolve(), { once: true });
  });
  stopping = true;
  await client.stop();
  return 0;
}

interface SimulateFlags {
  count: string;
  url: string;
  certs: string;
  pki?: string;
  stateDir?: string;
  protocol: string;
  serialPrefix?: string;
  firmwareUuid?: string;
  version?: string;
  failDownloadRate?: string;
  corruptRate?: string;
  dropConnectionRate?: string;
  rejectInstallRate?: string;
  slowLink?: string;
  badVersion?: string;
  badMode: BadMode;
  badFraction?: string;
  staggerMs?: string;
  seed?: string;
  duration?: string;
  untilVersion?: string;
  untilQuiet?: string;
  json?: boolean;
}

async function simulate(o: SimulateFlags, io: CliIo): Promise<number> {
  const count = int('count', o.count, 1);
  const rate = (flag: string, v: string | undefined) => {
    if (v === undefined) return 0;
    const n = Number(v);
    if (!(n >= 0 && n <= 1))
      throw new CliError(`--${flag} must be a probability from 0 to 1, got ${JSON.stringify(v)}`, 2);
    return n;
  };
  const duration = o.duration ? int('duration', o.duration, 1) : undefined;
  const quietMs = o.untilQuiet ? int('until-quiet', o.untilQuiet, 1) * 1000 : undefined;
  if (o.badFraction !== undefined && o.badVersion === undefined)
    throw new CliError('--bad-fraction needs --bad-version (the release that misbehaves)', 2);
  const sim = new Simulation({
    protocol: o.protocol,
    count,
    url: o.url,
    certsDir: path.resolve(o.certs),
    pkiDir: o.pki ? path.resolve(o.pki) : undefined,
    slotsDir: path.resolve(o.stateDir ?? path.join(o.certs, '..', 'slots')),
    serialPrefix: o.serialPrefix,
    firmware:
      o.firmwareUuid || o.version
        ? { uuid: o.firmwareUuid ?? randomUUID(), version: o.version ?? DEFAULT_FIRMWARE_VERSION }
        : undefined,
    faults: {
      failDownload: rate('fail-download-rate', o.failDownloadRate),
      corrupt: rate('corrupt-rate', o.corruptRate),
      dropConnection: rate('drop-connection-rate', o.dropConnectionRate),
      rejectInstall: rate('reject-install-rate', o.rejectInstallRate),
      slowLinkKbps: o.slowLink ? int('slow-link', o.slowLink, 1) : 0,
    },
    ...(o.badVersion
      ? {
          badRelease: {
            version: o.badVersion,
            mode: o.badMode,
            fraction: o.badFraction === undefined ? 1 : rate('bad-fraction', o.badFraction),
          },
        }
      : {}),
    staggerMs: o.staggerMs ? int('stagger-ms', o.staggerMs, 0) : 10,
    seed: o.seed ? int('seed', o.seed, 0) : 1,
  });
  const live = process.stderr.isTTY && io === processIo;
  const line = () => {
    const s = sim.summary();
    const failures = Object.entries(s.connectFailures)
      .map(([k, n]) => `${k} ${n}`)
      .join(', ');
    return `devices ${s.devices}  connected ${s.connected}  joined ${s.joined}  updating ${s.updating}  succeeded ${s.succeeded}  failed ${s.failed}${s.rolledBack ? `  rolled back ${s.rolledBack}` : ''}${s.hung ? `  hung ${s.hung}` : ''}${failures ? `  connect failures: ${failures}` : ''}`;
  };
  let lastLine = '';
  const ticker = setInterval(
    () => {
      if (live) return io.err(`\r${line()}\u001b[K`);
      // Not a terminal (a log file): one line when the counts change.
      const now = line();
      if (now !== lastLine) io.err(`${new Date().toISOString()} ${now}\n`);
      lastLine = now;
    },
    live ? 250 : 1000,
  );
  ticker.unref();
  sim.on('connect_reason', ({ serial, ...failure }) =>
    io.err(`${live ? '\r\u001b[K' : ''}${serial}: cannot connect to ${o.url}: ${formatConnectionFailure(failure)}\n`),
  );

  const untilVersion = o.untilVersion;
  const done = new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
    io.signal?.addEventListener('abort', () => resolve(), { once: true });
    if (duration) setTimeout(resolve, duration * 1000).unref();
    if (untilVersion) {
      const settled = () => sim.tallies.length === count && sim.tallies.every((t) => settledAt(t, untilVersion));
      sim.on('change', () => {
        if (settled()) resolve();
      });
    }
    if (quietMs) {
      let quiet: NodeJS.Timeout | undefined;
      const begun = () =>
        sim.tallies.some((t) => t.updating !== null || t.succeeded || t.failed || t.rolledBack || t.hung !== null);
      sim.on('change', () => {
        if (!begun()) return;
        clearTimeout(quiet);
        quiet = setTimeout(resolve, quietMs);
        quiet.unref();
      });
    }
  });
  await sim.start();
  await done;
  clearInterval(ticker);
  if (live) io.err(`\r${line()}\u001b[K\n`);
  const summary = sim.summary();
  await sim.stop();
  io.out(o.json ? `${JSON.stringify({ summary, devices: sim.tallies }, null, 2)}\n` : summaryTable(summary));
  return 0;
}

/**
 * A device is done with `version` when it rejoined running it (the server recorded the attempt as
 * succeeded before it acknowledged that join), its last update, to that version, failed or rolled
 * back, or it fell silent updating to it (a bad release in mode `hang`).
 */
function settledAt(t: DeviceTally, version: string): boolean {
  if (t.hung === version) return true;
  if (t.updating !== null) return false;
  if (t.running === version) return t.joined;
  return t.lastFailedVersion === version;
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
      processIo.err(
        `\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(pct * 100).toFixed(1).padStart(5)}%  ${mib(bytes)}/${mib(total)} MiB\u001b[K`,
      );
    },
    done() {
      if (shown) processIo.err('\n');
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
    throw new CliError(`--${flag} must be an integer ≥ ${min}, got ${JSON.stringify(value)}`, 2);
  return n;
}

// Runs when started as the program (bin/fleethub-device.js or `tsx device-client/cli.ts`), not when imported.
if (process.argv[1] && /(fleethub-device(\.js)?|device-client[\\/]cli\.ts)$/.test(process.argv[1]))
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
      // Done: a reconnect timer of a device that never connected must not hold the exit (up to 15 s).
      setTimeout(() => process.exit(code), 200).unref();
    },
    (err: unknown) => {
      process.stderr.write(`${(err as Error).message}\n`);
      process.exitCode = 1;
    },
  );
