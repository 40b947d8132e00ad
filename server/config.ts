import os from 'node:os';
import path from 'node:path';

/** Every setting of `fleethub serve`, from flags, then environment, then defaults. */
export interface Config {
  dataDir: string;
  databaseUrl?: string;
  host: string;
  apiPort: number;
  devicePort: number;
  keyauthPort: number;
  /** Certificates directory for the development PKI (created by `certs init`). */
  certsDir: string;
  /** Serve the API listener over TLS with the server certificate. */
  apiTls: boolean;
  /** Public base URL devices use for firmware downloads on the device listener. */
  devicePublicUrl: string;
  /** Name of this node in a cluster (presence, device.connected_node). */
  nodeName: string;
  logLevel: string;
  /** Allowed WebSocket Origins ('*' = any; empty = only requests without Origin or same host). */
  allowedOrigins: string[];
  heartbeatTimeoutMs: number;
  /** Secret for firmware URL signatures and operator JWTs (generated and stored in the data dir when absent). */
  secret?: string;
  /** Lifetime of signed firmware URLs. */
  firmwareUrlTtlSeconds: number;
  /** In-flight timeout of update attempts for products that set none (seconds). */
  updateTimeoutSeconds: number;
  /** Delays between a webhook delivery's attempts, e.g. `10s,1m,5m,30m,2h,8h`. */
  webhookRetryDelays: string;
  /** Create the default org/product and register the dev signer CA on first start. */
  bootstrapDev: boolean;
  /** WiFiDogX lab mode: approve unknown gateways automatically (needs wifidogxAuth `open`). */
  wifidogxAutoApprove: boolean;
  /** WiFiDogX gateway authentication: `secure` (approved gateways need their credential) or `open`. */
  wifidogxAuth: string;
  /** WiFiDogX connections that have not sent `connect` yet, at most. */
  wifidogxMaxUnidentified: number;
  /** How long a GRiSP board may take to answer `start_update` (it fetches the manifest first). */
  grispStartUpdateTimeoutMs: number;
}

export interface Setting {
  key: keyof Config;
  flag: string;
  env: string;
  kind: 'string' | 'number' | 'boolean' | 'list';
  help: string;
  default: (c: Partial<Config>) => Config[keyof Config] | undefined;
}

export const SETTINGS: Setting[] = [
  {
    key: 'dataDir',
    flag: 'data-dir',
    env: 'FLEETHUB_DATA_DIR',
    kind: 'string',
    help: 'data directory (PGlite files, firmware blobs, secrets)',
    default: () => path.resolve('data'),
  },
  {
    key: 'databaseUrl',
    flag: 'database-url',
    env: 'DATABASE_URL',
    kind: 'string',
    help: 'PostgreSQL URL; embedded PGlite when absent',
    default: () => undefined,
  },
  {
    key: 'host',
    flag: 'host',
    env: 'FLEETHUB_HOST',
    kind: 'string',
    help: 'address the listeners bind to',
    default: () => '127.0.0.1',
  },
  {
    key: 'apiPort',
    flag: 'api-port',
    env: 'FLEETHUB_API_PORT',
    kind: 'number',
    help: 'operator API / dashboard port',
    default: () => 4000,
  },
  {
    key: 'devicePort',
    flag: 'device-port',
    env: 'FLEETHUB_DEVICE_PORT',
    kind: 'number',
    help: 'mutual-TLS device port',
    default: () => 4001,
  },
  {
    key: 'keyauthPort',
    flag: 'keyauth-port',
    env: 'FLEETHUB_KEYAUTH_PORT',
    kind: 'number',
    help: 'public-key TCP protocol port (0 picks a free port, -1 disables)',
    default: () => 4002,
  },
  {
    key: 'certsDir',
    flag: 'certs-dir',
    env: 'FLEETHUB_CERTS_DIR',
    kind: 'string',
    help: 'PKI directory (default <data-dir>/pki)',
    default: (c) => path.join(c.dataDir ?? 'data', 'pki'),
  },
  {
    key: 'apiTls',
    flag: 'api-tls',
    env: 'FLEETHUB_API_TLS',
    kind: 'boolean',
    help: 'serve the API listener over TLS',
    default: () => false,
  },
  {
    key: 'devicePublicUrl',
    flag: 'device-public-url',
    env: 'FLEETHUB_DEVICE_PUBLIC_URL',
    kind: 'string',
    help: 'base URL devices reach the device listener at',
    default: (c) => `https://localhost:${c.devicePort ?? 4001}`,
  },
  {
    key: 'nodeName',
    flag: 'node-name',
    env: 'FLEETHUB_NODE_NAME',
    kind: 'string',
    help: "this node's name in a cluster",
    default: () => `${os.hostname()}-${process.pid}`,
  },
  {
    key: 'logLevel',
    flag: 'log-level',
    env: 'FLEETHUB_LOG_LEVEL',
    kind: 'string',
    help: 'pino log level',
    default: () => 'info',
  },
  {
    key: 'allowedOrigins',
    flag: 'allowed-origins',
    env: 'FLEETHUB_ALLOWED_ORIGINS',
    kind: 'list',
    help: 'comma-separated WebSocket Origins allowed (* for any)',
    default: () => [],
  },
  {
    key: 'heartbeatTimeoutMs',
    flag: 'idle-timeout-ms',
    env: 'FLEETHUB_IDLE_TIMEOUT_MS',
    kind: 'number',
    help: 'close sockets silent for this long',
    default: () => 60_000,
  },
  {
    key: 'secret',
    flag: 'secret',
    env: 'FLEETHUB_SECRET',
    kind: 'string',
    help: 'signing secret (generated into the data dir when absent)',
    default: () => undefined,
  },
  {
    key: 'firmwareUrlTtlSeconds',
    flag: 'firmware-url-ttl',
    env: 'FLEETHUB_FIRMWARE_URL_TTL',
    kind: 'number',
    help: 'lifetime of signed firmware URLs in seconds',
    default: () => 86_400,
  },
  {
    key: 'updateTimeoutSeconds',
    flag: 'update-timeout',
    env: 'FLEETHUB_UPDATE_TIMEOUT',
    kind: 'number',
    help: 'seconds an update may go without a word from its device before it is timed_out (products may set their own)',
    default: () => 1800,
  },
  {
    key: 'webhookRetryDelays',
    flag: 'webhook-retry-delays',
    env: 'FLEETHUB_WEBHOOK_RETRY_DELAYS',
    kind: 'string',
    help: 'delays before each retry of a failed webhook delivery (ms, s, m, h); one failing them all disables its webhook',
    default: () => '10s,1m,5m,30m,2h,8h',
  },
  {
    key: 'bootstrapDev',
    flag: 'bootstrap-dev',
    env: 'FLEETHUB_BOOTSTRAP_DEV',
    kind: 'boolean',
    help: 'create the default org/product and register the dev signer CA',
    default: () => true,
  },
  {
    key: 'wifidogxAutoApprove',
    flag: 'wifidogx-auto-approve',
    env: 'FLEETHUB_WIFIDOGX_AUTO_APPROVE',
    kind: 'boolean',
    help: 'approve unknown WiFiDogX gateways automatically (labs; needs --wifidogx-auth open)',
    default: () => false,
  },
  {
    key: 'wifidogxAuth',
    flag: 'wifidogx-auth',
    env: 'FLEETHUB_WIFIDOGX_AUTH',
    kind: 'string',
    help: 'secure: approved gateways connect with their credential; open: a device_id claim suffices (labs)',
    default: () => 'secure',
  },
  {
    key: 'wifidogxMaxUnidentified',
    flag: 'wifidogx-max-unidentified',
    env: 'FLEETHUB_WIFIDOGX_MAX_UNIDENTIFIED',
    kind: 'number',
    help: 'WiFiDogX connections waiting for their first connect, at most',
    default: () => 1000,
  },
  {
    key: 'grispStartUpdateTimeoutMs',
    flag: 'grisp-start-update-timeout-ms',
    env: 'FLEETHUB_GRISP_START_UPDATE_TIMEOUT_MS',
    kind: 'number',
    help: 'how long a GRiSP board may take to answer start_update (it fetches the manifest first)',
    default: () => 300_000,
  },
];

function parseValue(setting: Setting, raw: string): unknown {
  switch (setting.kind) {
    case 'number': {
      const n = Number(raw);
      if (!Number.isFinite(n)) throw new Error(`--${setting.flag} must be a number, got ${JSON.stringify(raw)}`);
      return n;
    }
    case 'boolean':
      return !/^(0|false|no|off)$/i.test(raw);
    case 'list':
      return raw
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean);
    case 'string':
      return raw;
  }
}

/** Resolves configuration: explicit overrides, then `--flags`, then environment, then defaults. */
export function loadConfig(
  argv: string[] = [],
  env: NodeJS.ProcessEnv = process.env,
  overrides: Partial<Config> = {},
): Config {
  const flags = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith('--')) continue;
    const [name, inline] = arg.slice(2).split(/=(.*)/s, 2) as [string, string | undefined];
    const setting = SETTINGS.find((s) => s.flag === name || s.flag === name.replace(/^no-/, ''));
    if (!setting) throw new Error(`unknown option --${name} (see fleethub serve --help)`);
    if (setting.kind === 'boolean' && inline === undefined) {
      flags.set(setting.flag, name.startsWith('no-') ? 'false' : 'true');
    } else {
      const value = inline ?? argv[++i];
      if (value === undefined) throw new Error(`--${name} needs a value`);
      flags.set(setting.flag, value);
    }
  }
  const config: Partial<Config> = {};
  for (const setting of SETTINGS) {
    let value: unknown = overrides[setting.key];
    if (value === undefined && flags.has(setting.flag)) value = parseValue(setting, flags.get(setting.flag)!);
    if (value === undefined && env[setting.env] !== undefined && env[setting.env] !== '')
      value = parseValue(setting, env[setting.env]!);
    if (value === undefined) value = setting.default(config);
    (config as Record<string, unknown>)[setting.key] = value;
  }
  config.dataDir = path.resolve(config.dataDir!);
  return config as Config;
}
