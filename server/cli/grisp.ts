/**
 * GRiSP operator commands: `fleethub grisp <subcommand>`, and `fleethub devices logs <device>` /
 * `fleethub devices link-token` (the same commands, registered on `devices` too).
 */
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { listRange, orgSession, printJson, printRecord, printRows, type CliIo, type CommonFlags } from './client.ts';
import { act, type CliContext, type PageFlags, paged, withOrg } from './command.ts';

/** `fleethub grisp ...` as the CLI runs it (kept for callers of the old entry point). */
export async function runGrispCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(['grisp', ...argv], io);
}

type Sub = 'logs' | 'link-token' | 'unlink' | 'show' | 'upload';

/** Adds the GRiSP subcommands `only` (default: all) to `parent`. */
export function registerGrispCommands(parent: Command, ctx: CliContext, only?: Sub[]): void {
  const { io } = ctx;
  const want = (s: Sub) => !only || only.includes(s);
  const base = (o: CommonFlags) => orgSession(o, io);
  if (want('logs'))
    act<CommonFlags & PageFlags & { before?: string; level?: string }>(
      paged(
        withOrg(
          parent
            .command('logs')
            .description("a GRiSP board's stored log events, newest first")
            .argument('<device>', 'id or identifier')
            .option('--before <id>', 'events older than this one')
            .option('--level <level>', 'only this level'),
        ),
      ),
      ctx,
      async (o, [device]) => {
        const range = listRange(o);
        const { api, list, org } = await base(o);
        const filters = { before: o.before, level: o.level };
        const { items } = await list(
          (page) =>
            api.GET('/api/v1/orgs/{org}/devices/{device}/logs', {
              params: { path: { org, device: device as string }, query: { ...filters, ...page } },
            }),
          range,
        );
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
        const { api, call, org } = await base(o);
        const created = await call(
          api.POST('/api/v1/orgs/{org}/grisp/link-tokens', {
            params: { path: { org } },
            body: o.ttl ? { ttl_seconds: Number(o.ttl) } : {},
          }),
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
        const { api, call, org } = await base(o);
        await call(
          api.DELETE('/api/v1/orgs/{org}/devices/{device}/link', {
            params: { path: { org, device: device as string } },
          }),
        );
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
        const { api, call, org } = await base(o);
        printRecord(
          io,
          o.json,
          await call(
            api.GET('/api/v1/orgs/{org}/devices/{device}/grisp', {
              params: { path: { org, device: device as string } },
            }),
          ),
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
        const { api, call, org } = await base(o);
        printRecord(
          io,
          o.json,
          await call(
            api.POST('/api/v1/grisp/firmware', {
              params: { query: { product: o.product, version: o.version, org } },
              body: readFileSync(file as string),
              bodySerializer: (bytes) => bytes as BodyInit,
              headers: { 'content-type': 'application/octet-stream' },
            }),
          ),
        );
      },
    );
}
