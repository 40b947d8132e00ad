/**
 * GRiSP operator commands: `fleethub grisp <subcommand>`, and `fleethub devices logs <device>` /
 * `fleethub devices link-token` (the same commands, registered on `devices` too).
 */
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import {
  clientFor,
  orgOf,
  orgPath,
  printJson,
  printRecord,
  printRows,
  type CliIo,
  type CommonFlags,
} from './client.ts';
import { act, type CliContext, withOrg } from './command.ts';

const enc = encodeURIComponent;

/** `fleethub grisp ...` as the CLI runs it (kept for callers of the old entry point). */
export async function runGrispCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(['grisp', ...argv], io);
}

type Sub = 'logs' | 'link-token' | 'unlink' | 'show' | 'upload';

/** Adds the GRiSP subcommands `only` (default: all) to `parent`. */
export function registerGrispCommands(parent: Command, ctx: CliContext, only?: Sub[]): void {
  const { io } = ctx;
  const want = (s: Sub) => !only || only.includes(s);
  const base = async (o: CommonFlags) => {
    const client = clientFor(o, io);
    return { client, org: await orgOf(client, o, io) };
  };
  if (want('logs'))
    act<CommonFlags & { limit?: string; before?: string; level?: string }>(
      withOrg(
        parent
          .command('logs')
          .description("a GRiSP board's stored log events, newest first")
          .argument('<device>', 'id or identifier')
          .option('--limit <n>', 'events per page')
          .option('--before <id>', 'events older than this one')
          .option('--level <level>', 'only this level'),
      ),
      ctx,
      async (o, [device]) => {
        const { client, org } = await base(o);
        const { items } = await client.get<{
          items: Array<{ id: string; seq: number | null; time: string | null; level: string | null; msg: unknown }>;
        }>(`${orgPath(org)}/devices/${enc(device as string)}/logs`, {
          limit: o.limit,
          before: o.before,
          level: o.level,
        });
        printRows(io, o.json, items, [
          { header: 'time', value: (e) => e.time },
          { header: 'level', value: (e) => e.level },
          { header: 'seq', value: (e) => e.seq },
          { header: 'message', value: (e) => (typeof e.msg === 'string' ? e.msg : JSON.stringify(e.msg)) },
          { header: 'id', value: (e) => e.id },
        ]);
      },
    );
  if (want('link-token'))
    act<CommonFlags & { ttl?: string }>(
      withOrg(
        parent
          .command('link-token')
          .description('create a single-use GRiSP device linking token (shown once)')
          .option('--ttl <seconds>', 'lifetime'),
      ),
      ctx,
      async (o) => {
        const { client, org } = await base(o);
        const created = await client.post<Record<string, unknown>>(
          `${orgPath(org)}/grisp/link-tokens`,
          o.ttl ? { ttl_seconds: Number(o.ttl) } : {},
        );
        if (o.json) return printJson(io, created);
        io.out(
          `token:   ${String(created.token)}\nexpires: ${String(created.expires_at)}\n(shown once; give it to the board's owner for post device_linking_token)\n`,
        );
      },
    );
  if (want('unlink'))
    act<CommonFlags>(
      withOrg(parent.command('unlink').description('unlink a board').argument('<device>', 'id or identifier')),
      ctx,
      async (o, [device]) => {
        const { client, org } = await base(o);
        await client.delete(`${orgPath(org)}/devices/${enc(device as string)}/link`);
        io.out('unlinked\n');
      },
    );
  if (want('show'))
    act<CommonFlags>(
      withOrg(
        parent
          .command('show')
          .description("a board's system_info, update status and link")
          .argument('<device>', 'id or identifier'),
      ),
      ctx,
      async (o, [device]) => {
        const { client, org } = await base(o);
        printRecord(
          io,
          o.json,
          await client.get<Record<string, unknown>>(`${orgPath(org)}/devices/${enc(device as string)}/grisp`),
        );
      },
    );
  if (want('upload'))
    act<CommonFlags & { product: string; version: string }>(
      withOrg(
        parent
          .command('upload')
          .description('upload a GRiSP update package')
          .argument('<package>', 'the package (.tar)')
          .requiredOption('--product <product>', 'product name or id')
          .requiredOption('--version <version>', 'its version'),
      ),
      ctx,
      async (o, [file]) => {
        const { client, org } = await base(o);
        const qs = new URLSearchParams({ product: o.product, version: o.version, org }).toString();
        printRecord(
          io,
          o.json,
          await client.request<Record<string, unknown>>(
            'POST',
            `/api/v1/grisp/firmware?${qs}`,
            readFileSync(file as string),
            'application/octet-stream',
          ),
        );
      },
    );
}
