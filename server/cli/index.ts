/**
 * `fleethub <command>`: one entry point for the server, its PKI tooling and the operator CLI, on
 * commander: the tree declared here and in the modules it calls is the only source of the
 * commands' arguments, options and help. Server-side commands load their module when they run,
 * so `fleethub certs` never opens a database and `fleethub --help` loads no database driver.
 */
import { Command, Option } from 'commander';
import { SETTINGS } from '../config.ts';
import { processIo, type CliIo } from './client.ts';
import { act, type CliContext, finishTree, packageVersion, runProgram } from './command.ts';
import { registerDeploymentsCommands } from './deployments.ts';
import { registerFirmwareStoreCommands } from './firmware.ts';
import { registerGrispCommands } from './grisp.ts';
import { registerKeyauthCommands } from './keyauth.ts';
import { registerMainServerCommands } from './main-server.ts';
import { registerAccountCommands } from './operator.ts';
import {
  registerDevicesCommands,
  registerFirmwareRecordCommands,
  registerGroupsCommands,
  registerStatusCommand,
  registerTargetCommands,
} from './operator-fleet.ts';
import { registerWebhooksCommands } from './webhooks.ts';
import { registerWifidogxCommands } from './wifidogx.ts';

/** The whole `fleethub` command tree, writing to `ctx.io`. */
export function buildProgram(ctx: CliContext): Command {
  const program = new Command('fleethub')
    .description('fleethub: the server, its development PKI, and the operator CLI over the REST API')
    .version(packageVersion(import.meta.dirname), '-V, --version', 'print the version')
    .helpOption('-h, --help', 'show help')
    // Options before the command belong to the program; after it, to the command (`devices --version`).
    .enablePositionalOptions()
    .addHelpText(
      'after',
      '\nExit codes: 0 ok, 1 failure, 2 usage error, 3 timeout (status --until, deployments watch), 4 paused, 5 aborted (deployments watch). docs/cli.md',
    );
  registerServerCommands(program, ctx);
  registerAccountCommands(program, ctx);
  const devices = registerDevicesCommands(program, ctx);
  registerGrispCommands(devices, ctx, ['logs', 'link-token']);
  registerGroupsCommands(program, ctx);
  registerFirmwareStoreCommands(registerFirmwareRecordCommands(program, ctx), ctx);
  registerTargetCommands(program, ctx);
  registerStatusCommand(program, ctx);
  registerDeploymentsCommands(program, ctx);
  registerMainServerCommands(program, ctx);
  registerKeyauthCommands(program, ctx);
  registerGrispCommands(program.command('grisp').description('GRiSP boards (grisp_connect)'), ctx);
  registerWebhooksCommands(program, ctx);
  registerWifidogxCommands(program, ctx);
  return finishTree(program, ctx.io);
}

/** serve, migrate, certs, users: they work on the server's own files and database. */
function registerServerCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const serve = program
    .command('serve')
    .description('run a server node (npm start); every option is also an environment variable');
  for (const s of SETTINGS) {
    const help = `${s.help} (${s.env})`;
    if (s.kind === 'boolean') {
      serve.addOption(new Option(`--${s.flag}`, help));
      serve.addOption(new Option(`--no-${s.flag}`, `turn ${s.flag} off`).hideHelp());
    } else serve.addOption(new Option(`--${s.flag} <value>`, help));
  }
  act(serve, ctx, async (o) => {
    // Back to the flags loadConfig reads, which also knows each setting's environment variable.
    const argv: string[] = [];
    for (const s of SETTINGS) {
      const key = s.flag.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
      const value = o[key] as string | boolean | undefined;
      if (value !== undefined) argv.push(`--${s.flag}=${String(value)}`);
    }
    return (await import('./serve.ts')).runServeCommand(argv);
  });

  const database = (cmd: Command) =>
    cmd
      .option('--data-dir <dir>', 'data directory, as for fleethub serve (FLEETHUB_DATA_DIR)')
      .option('--database-url <url>', 'PostgreSQL instead of the embedded database (DATABASE_URL)');
  const migrate = program.command('migrate').description('database migrations (also run at every start)');
  for (const [action, description] of [
    ['up', 'apply every pending migration'],
    ['down', 'revert the most recent migration'],
    ['status', 'list migrations and when each was applied'],
  ] as const)
    act(database(migrate.command(action, { isDefault: action === 'up' }).description(description)), ctx, async (o) =>
      (await import('./migrate.ts')).runMigrate(action, o, io),
    );

  const certs = program
    .command('certs')
    .description('development PKI: a root CA, a device-signer CA, a server certificate; device certificates');
  const pkiDir = (cmd: Command) =>
    cmd
      .option('--dir <dir>', 'PKI directory (default <data-dir>/pki, FLEETHUB_CERTS_DIR)')
      .option('--data-dir <dir>', 'as for fleethub serve, to find the default PKI directory')
      .option('--certs-dir <dir>', 'as for fleethub serve (same as --dir)');
  act(
    pkiDir(
      certs
        .command('init')
        .description('create what is missing of the PKI (never overwrites a key)')
        .option(
          '--host <name>',
          'a DNS name or IP of the server certificate; repeatable (default localhost, 127.0.0.1, ::1)',
          (v: string, prev: string[] = []) => [...prev, v],
        ),
    ),
    ctx,
    async (o) => (await import('./certs.ts')).runCerts('init', o, io),
  );
  act(
    pkiDir(
      certs
        .command('device')
        .description('issue a certificate for a device (CN = serial): DIR/cert.pem, DIR/key.pem, DIR/ca.pem')
        .argument('<serial>', 'the device serial number')
        .requiredOption('--out <dir>', 'where to write the files'),
    ),
    ctx,
    async (o, [serial]) => (await import('./certs.ts')).runCerts('device', o, io, serial as string),
  );

  const users = program
    .command('users')
    .description('operator accounts, in the database directly (no running server needed)');
  act(
    database(
      users
        .command('create')
        .description('create a user: without --org one that sees every organization')
        .requiredOption('--email <email>', 'their email')
        .option('--password <password>', 'their password (FLEETHUB_PASSWORD)')
        .requiredOption('--role <role>', 'admin | operator | viewer')
        .option('--org <org>', 'the one organization they see')
        .option('--name <name>', 'display name')
        .option('--json', 'print JSON'),
    ),
    ctx,
    async (o) => (await import('./users.ts')).runUsers('create', o, io),
  );
  act(database(users.command('list').description('every user').option('--json', 'print JSON')), ctx, async (o) =>
    (await import('./users.ts')).runUsers('list', o, io),
  );
}

/** Runs `fleethub <argv>`; resolves to the exit code (docs/cli.md). */
export async function main(argv: string[], io: CliIo = processIo): Promise<number> {
  const ctx: CliContext = { io, exitCode: 0 };
  return runProgram(buildProgram(ctx), ctx, argv);
}

// `tsx server/cli/index.ts ...` (npm run dev, the tests) runs it directly; bin/fleethub.js calls main().
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
