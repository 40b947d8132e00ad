/**
 * `fleethub <command>`: one entry point for the server, its PKI tooling and the operator CLI.
 * Commands load their module lazily so `fleethub certs` never opens a database.
 */
type Command = (argv: string[]) => Promise<number>;

const COMMANDS: Record<string, { help: string; run: () => Promise<Command> }> = {
  serve: { help: 'run the server (fleethub serve --help lists every option)', run: async () => (await import('./serve.ts')).runServeCommand },
  migrate: { help: 'database migrations: up | down | status', run: async () => (await import('./migrate.ts')).runMigrateCommand },
  certs: { help: 'development PKI: init | device <serial> --out DIR', run: async () => (await import('./certs.ts')).runCertsCommand },
};

function usage(): string {
  const lines = ['Usage: fleethub <command> [options]', '', 'Commands:'];
  for (const [name, c] of Object.entries(COMMANDS)) lines.push(`  ${name.padEnd(10)} ${c.help}`);
  lines.push('', 'Run `fleethub <command> --help` for a command\'s options.');
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
