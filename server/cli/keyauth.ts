/** `fleethub keyauth list | approve | revoke`: client keys of the public-key TCP protocol (keyauth). */
import type { Command } from 'commander';
import { clientFor, printJson, printRows, type CliIo, type CommonFlags } from './client.ts';
import { act, type CliContext, withServer } from './command.ts';

/** `fleethub keyauth ...` as the CLI runs it (kept for callers of the old entry point). */
export async function runKeyauthCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(['keyauth', ...argv], io);
}

interface ClientRow {
  fingerprint: string;
  identifier: string;
  name: string | null;
  approval: string;
  status: string;
  remote_address: string | null;
  last_seen_at: string;
}

export function registerKeyauthCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const keyauth = program.command('keyauth').description('public-key TCP clients (keyauth)');
  act<CommonFlags & { pending?: boolean }>(
    withServer(
      keyauth
        .command('list', { isDefault: true })
        .description('client keys')
        .option('--pending', 'only the approval queue'),
    ),
    ctx,
    async (o) => {
      const { items } = await clientFor(o, io).get<{ items: ClientRow[] }>('/api/v1/keyauth/clients', {
        approval: o.pending ? 'pending' : undefined,
      });
      printRows(io, o.json, items, [
        { header: 'fingerprint', value: (c) => c.fingerprint },
        { header: 'device', value: (c) => c.identifier },
        { header: 'name', value: (c) => c.name },
        { header: 'approval', value: (c) => c.approval },
        { header: 'status', value: (c) => c.status },
        { header: 'last seen', value: (c) => c.last_seen_at },
      ]);
    },
  );
  for (const sub of ['approve', 'revoke'] as const)
    act<CommonFlags>(
      withServer(
        keyauth
          .command(sub)
          .description(sub === 'approve' ? 'approve a key' : 'revoke a key; its connections close')
          .argument('<fingerprint>', 'SHA-256 hex, or a unique prefix of 8+ digits'),
      ),
      ctx,
      async (o, [ref]) => {
        const row = await clientFor(o, io).post<ClientRow>(
          `/api/v1/keyauth/clients/${encodeURIComponent(ref as string)}/${sub}`,
        );
        if (o.json) printJson(io, row);
        else io.out(`${row.fingerprint} (${row.identifier}): ${row.approval}\n`);
      },
    );
}
