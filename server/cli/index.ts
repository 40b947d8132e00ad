/**
 * `fleethub <command>`: one entry point for the server, its PKI tooling and the operator CLI.
 * Commands load their module lazily so `fleethub certs` never opens a database.
 */
type Command = (argv: string[]) => Promise<number>;

const COMMANDS: Record<string, { help: string; run: () => Promise<Command> }> = {
  serve: {
    help: 'run the server (fleethub serve --help lists every option)',
    run: async () => (await import('./serve.ts')).runServeCommand,
  },
  migrate: {
    help: 'database migrations: up | down | status',
    run: async () => (await import('./migrate.ts')).runMigrateCommand,
  },
  certs: {
    help: 'development PKI: init | device <serial> --out DIR',
    run: async () => (await import('./certs.ts')).runCertsCommand,
  },
  users: {
    help: 'operator accounts: create --email --password --role [--org] | list',
    run: async () => (await import('./users.ts')).runUsersCommand,
  },
  'main-server': {
    help: 'Main Server devices (seed 000): devices | approve | revoke | rotate-token | pack | upload | schedule | deploy',
    run: async () => (await import('./main-server.ts')).runMainServerCommand,
  },
  keyauth: {
    help: 'public-key TCP clients (seed 003): list | approve | revoke <fingerprint>',
    run: async () => (await import('./keyauth.ts')).runKeyauthCommand,
  },
  grisp: {
    help: 'GRiSP boards (seed 004): firmware packages, logs, linking tokens, validation',
    run: async () => (await import('./grisp.ts')).runGrispCommand,
  },
  webhooks: {
    help: 'webhooks: create <url> --events ... | list | show | deliveries | enable | disable | delete',
    run: async () => (await import('./webhooks.ts')).runWebhooksCommand,
  },
  wifidogx: {
    help: 'WiFiDogX gateways (seed 001): approve | auth-mode | auth | kickoff | tmp-pass | firmware-info | upgrade | release',
    run: async () => (await import('./wifidogx.ts')).runWifidogxCommand,
  },
};

// Operator commands talk to a running server over the REST API (server/cli/operator.ts).
const OPERATOR_HELP: Record<string, string> = {
  login: 'log in to a fleethub server and save the token',
  orgs: 'organizations',
  products: 'products',
  devices: 'devices: list | show | updates | logs | link-token',
  groups: 'groups: create | list | add | remove | delete',
  firmware: 'firmware: upload | list | show | delete | keys | sign | keygen',
  target: 'targets: set | clear for a group or a device',
  status: 'counts by version and update state (--watch)',
  tokens: 'API tokens for automation',
};
for (const [name, help] of Object.entries(OPERATOR_HELP)) {
  COMMANDS[name] = { help, run: async () => (argv) => runOperator(name, argv) };
}

/** Firmware image commands (upload, signing keys) live with the firmware store's CLI. */
const FIRMWARE_STORE_ACTIONS = new Set(['upload', 'keys', 'sign', 'keygen']);

/** Device commands that GRiSP boards answer (logs from `log.get`, linking tokens). */
const GRISP_DEVICE_ACTIONS = new Set(['logs', 'link-token']);

async function runOperator(name: string, argv: string[]): Promise<number> {
  if (name === 'firmware' && argv[0] && FIRMWARE_STORE_ACTIONS.has(argv[0])) {
    return (await import('./firmware.ts')).runFirmwareCommand(argv);
  }
  if (name === 'devices' && argv[0] && GRISP_DEVICE_ACTIONS.has(argv[0])) {
    return (await import('./grisp.ts')).runGrispCommand(argv);
  }
  return (await import('./operator.ts')).runOperatorCommand([name, ...argv]);
}

function usage(): string {
  const lines = ['Usage: fleethub <command> [options]', '', 'Commands:'];
  for (const [name, c] of Object.entries(COMMANDS)) lines.push(`  ${name.padEnd(12)} ${c.help}`);
  lines.push('', "Run `fleethub <command> --help` for a command's options.");
  return lines.join('\n');
}

/** Registers a command (edges add theirs without touching this table's literal). */
export function registerCommand(name: string, help: string, run: () => Promise<Command>): void {
  COMMANDS[name] = { help, run };
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    console.log(usage());
    return name ? 0 : 2;
  }
  const command = COMMANDS[name];
  if (!command) {
    console.error(`unknown command ${JSON.stringify(name)}\n\n${usage()}`);
    return 2;
  }
  return (await command.run())(rest);
}

// `tsx server/cli/index.ts ...` (npm start) runs it directly; bin/fleethub.js calls main().
if (process.argv[1] && /cli[\\/]index\.ts$/.test(process.argv[1])) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      console.error(err instanceof Error ? err.message : String(err));
      process.exitCode = 1;
    },
  );
}
