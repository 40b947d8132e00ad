/**
 * `fleethub webhooks create|list|show|deliveries|enable|disable|delete`: an org's webhook
 * subscriptions and their delivery logs, through the generated API client.
 */
import {
  apiFor,
  call,
  helpRequested,
  orgOf,
  parseCommand,
  printJson,
  printRecord,
  printRows,
  processIo,
  resolveClientOptions,
  runCommand,
  usageError,
  ApiClient,
  type CliIo,
} from './client.ts';

const USAGE = `Usage:
  fleethub webhooks create <url> --events E[,E...] [--description TEXT]
                                            subscribe a receiver; prints its signing secret once
  fleethub webhooks list                    the org's webhooks (enabled, or why disabled)
  fleethub webhooks show <id>               one webhook
  fleethub webhooks deliveries <id> [--state pending|delivered|failed] [--limit N]
                                            its delivery log, newest first
  fleethub webhooks enable|disable <id>     enable a disabled webhook again (its waiting deliveries go out) | pause it
  fleethub webhooks delete <id>             delete it and its delivery log
Events: device.online device.offline update.transition target.changed, or * for all
Options: --org --json --url --token`;

export async function runWebhooksCommand(argv: string[], io: CliIo = processIo): Promise<number> {
  return runCommand(io, async () => {
    const { values, positionals } = parseCommand(
      argv,
      {
        org: { type: 'string' },
        events: { type: 'string' },
        description: { type: 'string' },
        state: { type: 'string' },
        limit: { type: 'string' },
      },
      USAGE,
    );
    const help = helpRequested(values, USAGE, io);
    if (help !== undefined) return help;
    const options = resolveClientOptions(values, io.env);
    const api = apiFor(values, io);
    const org = await orgOf(new ApiClient(options), values, io);
    const [sub, arg] = positionals;
    const needId = () => {
      if (!arg) throw usageError(`webhooks ${sub} needs the webhook id`, USAGE);
      return { org, id: arg };
    };
    switch (sub ?? 'list') {
      case 'create': {
        if (!arg) throw usageError('webhooks create needs the receiver URL', USAGE);
        if (!values.events) throw usageError('webhooks create needs --events', USAGE);
        const created = await call(
          api.POST('/api/v1/orgs/{org}/webhooks', {
            params: { path: { org } },
            body: {
              url: arg,
              events: values.events.split(',').map((e) => e.trim()) as never,
              description: values.description ?? null,
            },
          }),
          options,
        );
        if (values.json) printJson(io, created);
        else {
          printRecord(io, false, { id: created.id, url: created.url, events: created.events });
          io.out(`secret  ${created.secret}\n(the signing secret is shown only now: keep it with the receiver)\n`);
        }
        return 0;
      }
      case 'list': {
        const { items } = await call(
          api.GET('/api/v1/orgs/{org}/webhooks', { params: { path: { org }, query: { limit: 1000 } } }),
          options,
        );
        printRows(io, values.json, items, [
          { header: 'id', value: (w) => w.id },
          { header: 'url', value: (w) => w.url },
          { header: 'events', value: (w) => w.events },
          { header: 'enabled', value: (w) => (w.enabled ? 'yes' : `no: ${w.disabled_reason ?? ''}`) },
        ]);
        return 0;
      }
      case 'show': {
        const hook = await call(api.GET('/api/v1/orgs/{org}/webhooks/{id}', { params: { path: needId() } }), options);
        printRecord(io, values.json, hook);
        return 0;
      }
      case 'deliveries': {
        const state = values.state as 'pending' | 'delivered' | 'failed' | undefined;
        if (state && !['pending', 'delivered', 'failed'].includes(state))
          throw usageError(`--state must be pending, delivered or failed, not ${state}`, USAGE);
        const page = await call(
          api.GET('/api/v1/orgs/{org}/webhooks/{id}/deliveries', {
            params: { path: needId(), query: { state, limit: values.limit ? Number(values.limit) : 50 } },
          }),
          options,
        );
        if (values.json) {
          printJson(io, page);
          return 0;
        }
        printRows(io, false, page.items, [
          { header: 'created', value: (d) => d.created_at },
          { header: 'event', value: (d) => d.event },
          { header: 'state', value: (d) => d.state },
          { header: 'attempts', value: (d) => d.attempts },
          { header: 'last', value: (d) => d.last_status ?? d.last_error },
          { header: 'id', value: (d) => d.id },
        ]);
        io.out(`${page.items.length} of ${page.total}\n`);
        return 0;
      }
      case 'enable':
      case 'disable': {
        const hook = await call(
          api.PATCH('/api/v1/orgs/{org}/webhooks/{id}', {
            params: { path: needId() },
            body: { enabled: sub === 'enable' },
          }),
          options,
        );
        if (values.json) printJson(io, hook);
        else io.out(`${hook.id}: ${hook.enabled ? 'enabled' : 'disabled'}\n`);
        return 0;
      }
      case 'delete': {
        await call(api.DELETE('/api/v1/orgs/{org}/webhooks/{id}', { params: { path: needId() } }), options);
        io.out(`deleted ${arg}\n`);
        return 0;
      }
      default:
        throw usageError(`unknown webhooks command ${JSON.stringify(sub)}`, USAGE);
    }
  });
}
