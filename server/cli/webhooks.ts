/**
 * `fleethub webhooks create|list|show|deliveries|enable|disable|delete`: an org's webhook
 * subscriptions and their delivery logs, through the generated API client.
 */
import type { Command } from 'commander';
import { orgApi, call, printJson, printRecord, printRows, usageError, type CliIo, type CommonFlags } from './client.ts';
import { act, type CliContext, withOrg } from './command.ts';

/** `fleethub webhooks ...` as the CLI runs it (kept for callers of the old entry point). */
export async function runWebhooksCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(['webhooks', ...argv], io);
}

type Flags = CommonFlags & { events?: string; description?: string; state?: string; limit?: string };

export function registerWebhooksCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const webhooks = program
    .command('webhooks')
    .description(
      'signed deliveries of fleet events to your receivers (events: device.online device.offline update.transition target.changed, or *)',
    );
  const context = (o: Flags) => orgApi(o, io);
  const withId = (name: string, description: string) =>
    withOrg(webhooks.command(name).description(description).argument('<id>', 'the webhook id'));

  act<Flags>(
    withOrg(
      webhooks
        .command('create')
        .description('subscribe a receiver; prints its signing secret once')
        .argument('<url>', 'the receiver')
        .requiredOption('--events <list>', 'comma-separated events, or * for all')
        .option('--description <text>', 'what it is for'),
    ),
    ctx,
    async (o, [url]) => {
      const { options, api, org } = await context(o);
      const created = await call(
        api.POST('/api/v1/orgs/{org}/webhooks', {
          params: { path: { org } },
          body: {
            url: url as string,
            events: o.events!.split(',').map((e) => e.trim()) as never,
            description: o.description ?? null,
          },
        }),
        options,
      );
      if (o.json) return printJson(io, created);
      printRecord(io, false, { id: created.id, url: created.url, events: created.events });
      io.out(`secret  ${created.secret}\n(the signing secret is shown only now: keep it with the receiver)\n`);
    },
  );
  act<Flags>(
    withOrg(webhooks.command('list', { isDefault: true }).description("the org's webhooks (enabled, or why disabled)")),
    ctx,
    async (o) => {
      const { options, api, org } = await context(o);
      const { items } = await call(
        api.GET('/api/v1/orgs/{org}/webhooks', { params: { path: { org }, query: { limit: 1000 } } }),
        options,
      );
      printRows(io, o.json, items, [
        { header: 'id', value: (w) => w.id },
        { header: 'url', value: (w) => w.url },
        { header: 'events', value: (w) => w.events },
        { header: 'enabled', value: (w) => (w.enabled ? 'yes' : `no: ${w.disabled_reason ?? ''}`) },
      ]);
    },
  );
  act<Flags>(withId('show', 'one webhook'), ctx, async (o, [id]) => {
    const { options, api, org } = await context(o);
    const hook = await call(
      api.GET('/api/v1/orgs/{org}/webhooks/{id}', { params: { path: { org, id: id as string } } }),
      options,
    );
    printRecord(io, o.json, hook);
  });
  act<Flags>(
    withId('deliveries', 'its delivery log, newest first')
      .option('--state <state>', 'pending | delivered | failed')
      .option('--limit <n>', 'how many (default 50)'),
    ctx,
    async (o, [id]) => {
      const state = o.state as 'pending' | 'delivered' | 'failed' | undefined;
      if (state && !['pending', 'delivered', 'failed'].includes(state))
        throw usageError(`--state must be pending, delivered or failed, not ${state}`);
      const { options, api, org } = await context(o);
      const page = await call(
        api.GET('/api/v1/orgs/{org}/webhooks/{id}/deliveries', {
          params: { path: { org, id: id as string }, query: { state, limit: o.limit ? Number(o.limit) : 50 } },
        }),
        options,
      );
      if (o.json) return printJson(io, page);
      printRows(io, false, page.items, [
        { header: 'created', value: (d) => d.created_at },
        { header: 'event', value: (d) => d.event },
        { header: 'state', value: (d) => d.state },
        { header: 'attempts', value: (d) => d.attempts },
        { header: 'last', value: (d) => d.last_status ?? d.last_error },
        { header: 'id', value: (d) => d.id },
      ]);
      io.out(`${page.items.length} of ${page.total}\n`);
    },
  );
  for (const [name, description] of [
    ['enable', 'enable a disabled webhook again (its waiting deliveries go out)'],
    ['disable', 'pause it'],
  ] as const)
    act<Flags>(withId(name, description), ctx, async (o, [id]) => {
      const { options, api, org } = await context(o);
      const hook = await call(
        api.PATCH('/api/v1/orgs/{org}/webhooks/{id}', {
          params: { path: { org, id: id as string } },
          body: { enabled: name === 'enable' },
        }),
        options,
      );
      if (o.json) printJson(io, hook);
      else io.out(`${hook.id}: ${hook.enabled ? 'enabled' : 'disabled'}\n`);
    });
  act<Flags>(withId('delete', 'delete it and its delivery log'), ctx, async (o, [id]) => {
    const { options, api, org } = await context(o);
    await call(
      api.DELETE('/api/v1/orgs/{org}/webhooks/{id}', { params: { path: { org, id: id as string } } }),
      options,
    );
    io.out(`deleted ${id as string}\n`);
  });
}
