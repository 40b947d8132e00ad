/** `fleethub keyauth list [--pending] | approve <fingerprint> | revoke <fingerprint>`: client keys of the public-key TCP protocol (seed 003). */
import {
  clientFor,
  helpRequested,
  parseCommand,
  printJson,
  printRows,
  processIo,
  runCommand,
  usageError,
  type CliIo,
} from './client.ts';

const USAGE = `Usage:
  fleethub keyauth list [--pending]          client keys (the approval queue with --pending)
  fleethub keyauth approve <fingerprint>     approve a key (SHA-256 hex, or a unique prefix of 8+ digits)
  fleethub keyauth revoke <fingerprint>      revoke a key; its connections close
Options: --json --url --token`;

interface ClientRow {
  fingerprint: string;
  identifier: string;
  name: string | null;
  approval: string;
  status: string;
  remote_address: string | null;
  last_seen_at: string;
}

export async function runKeyauthCommand(argv: string[], io: CliIo = processIo): Promise<number> {
  return runCommand(io, async () => {
    const { values, positionals } = parseCommand(argv, { pending: { type: 'boolean' } }, USAGE);
    const help = helpRequested(values, USAGE, io);
    if (help !== undefined) return help;
    const client = clientFor(values, io);
    const [sub, ref] = positionals;
    switch (sub ?? 'list') {
      case 'list': {
        const { items } = await client.get<{ items: ClientRow[] }>('/api/v1/keyauth/clients', {
          approval: values.pending ? 'pending' : undefined,
        });
        printRows(io, values.json, items, [
          { header: 'fingerprint', value: (c) => c.fingerprint },
          { header: 'device', value: (c) => c.identifier },
          { header: 'name', value: (c) => c.name },
          { header: 'approval', value: (c) => c.approval },
          { header: 'status', value: (c) => c.status },
          { header: 'last seen', value: (c) => c.last_seen_at },
        ]);
        return 0;
      }
      case 'approve':
      case 'revoke': {
        if (!ref) throw usageError('missing <fingerprint>', USAGE);
        const row = await client.post<ClientRow>(`/api/v1/keyauth/clients/${encodeURIComponent(ref)}/${sub}`);
        if (values.json) printJson(io, row);
        else io.out(`${row.fingerprint} (${row.identifier}): ${row.approval}\n`);
        return 0;
      }
      default:
        throw usageError(`unknown subcommand ${JSON.stringify(sub)}`, USAGE);
    }
  });
}
