/**
 * GRiSP operator commands. The lead routes `fleethub devices logs <device>` and
 * `fleethub devices link-token` here (runGrispCommand(['logs', ...]) / (['link-token', ...])),
 * and `fleethub grisp <subcommand>` as a whole.
 */
import { readFileSync } from 'node:fs';
import {
  clientFor,
  helpRequested,
  orgOf,
  orgPath,
  parseCommand,
  printJson,
  printRecord,
  printRows,
  processIo,
  runCommand,
  usageError,
  type CliIo,
} from './client.ts';

const USAGE = `Usage:
  fleethub grisp logs <device> [--limit N] [--before ID] [--level L]   stored board log events, newest first
  fleethub grisp link-token [--ttl SECONDS]                             create a single-use device linking token
  fleethub grisp unlink <device>                                        unlink a board
  fleethub grisp show <device>                                          system_info, update status, link
  fleethub grisp upload <package.tar> --product P --version V           upload a GRiSP update package
(also: fleethub devices logs <device>, fleethub devices link-token)
Options: --org O --json --url --token`;

const enc = encodeURIComponent;

export async function runGrispCommand(argv: string[], io: CliIo = processIo): Promise<number> {
  return runCommand(io, async () => {
    const { values, positionals } = parseCommand(
      argv,
      {
        org: { type: 'string' },
        limit: { type: 'string' },
        before: { type: 'string' },
        level: { type: 'string' },
        ttl: { type: 'string' },
        product: { type: 'string' },
        version: { type: 'string' },
      },
      USAGE,
    );
    const help = helpRequested(values, USAGE, io);
    if (help !== undefined) return help;
    const [sub, arg] = positionals;
    const client = clientFor(values, io);
    const org = await orgOf(client, values, io);
    switch (sub) {
      case 'logs': {
        if (!arg) throw usageError('name the device', USAGE);
        const { items } = await client.get<{
          items: Array<{ id: string; seq: number | null; time: string | null; level: string | null; msg: unknown }>;
        }>(`${orgPath(org)}/devices/${enc(arg)}/logs`, {
          limit: values.limit,
          before: values.before,
          level: values.level,
        });
        printRows(io, values.json, items, [
          { header: 'time', value: (e) => e.time },
          { header: 'level', value: (e) => e.level },
          { header: 'seq', value: (e) => e.seq },
          { header: 'message', value: (e) => (typeof e.msg === 'string' ? e.msg : JSON.stringify(e.msg)) },
          { header: 'id', value: (e) => e.id },
        ]);
        return 0;
      }
      case 'link-token': {
        const created = await client.post<Record<string, unknown>>(
          `${orgPath(org)}/grisp/link-tokens`,
          values.ttl ? { ttl_seconds: Number(values.ttl) } : {},
        );
        if (values.json) printJson(io, created);
        else
          io.out(
            `token:   ${String(created.token)}\nexpires: ${String(created.expires_at)}\n(shown once; give it to the board's owner for post device_linking_token)\n`,
          );
        return 0;
      }
      case 'unlink':
        if (!arg) throw usageError('name the device', USAGE);
        await client.delete(`${orgPath(org)}/devices/${enc(arg)}/link`);
        io.out('unlinked\n');
        return 0;
      case 'show':
        if (!arg) throw usageError('name the device', USAGE);
        printRecord(
          io,
          values.json,
          await client.get<Record<string, unknown>>(`${orgPath(org)}/devices/${enc(arg)}/grisp`),
        );
        return 0;
      case 'upload': {
        if (!arg || !values.product || !values.version)
          throw usageError('upload needs <package.tar> --product P --version V', USAGE);
        const body = readFileSync(arg);
        const qs = new URLSearchParams({ product: values.product, version: values.version, org }).toString();
        printRecord(
          io,
          values.json,
          await client.request<Record<string, unknown>>(
            'POST',
            `/api/v1/grisp/firmware?${qs}`,
            body,
            'application/octet-stream',
          ),
        );
        return 0;
      }
      default:
        throw usageError(sub ? `unknown subcommand ${JSON.stringify(sub)}` : 'name a subcommand', USAGE);
    }
  });
}
