/** Operator CLI commands over the fleet: devices, groups, firmware records, targets, status (with --watch). */
import { Socket, type SocketConnectOption } from 'phoenix';
import WebSocket from 'ws';
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
  usageError,
  type ApiClient,
  type CliIo,
  type Column,
} from './client.ts';

const ORG_OPTION = { org: { type: 'string' } } as const;
const enc = encodeURIComponent;

interface Device {
  id: string;
  identifier: string;
  product_id: string;
  firmware_version: string | null;
  connection_status: string;
  last_seen_at: string | null;
  tags: string[];
  description: string | null;
}
const DEVICE_COLUMNS: Column<Device>[] = [
  { header: 'identifier', value: (d) => d.identifier },
  { header: 'status', value: (d) => d.connection_status },
  { header: 'version', value: (d) => d.firmware_version },
  { header: 'last seen', value: (d) => d.last_seen_at },
  { header: 'tags', value: (d) => d.tags },
  { header: 'id', value: (d) => d.id },
];

interface Page<T> {
  items: T[];
  total: number;
}

function footer(io: CliIo, json: boolean | undefined, page: Page<unknown>, offset: number): void {
  if (!json && page.total > page.items.length)
    io.out(`(${offset + 1}-${offset + page.items.length} of ${page.total}; use --limit/--offset)\n`);
}

// ---------------------------------------------------------------------------------------------

const DEVICES_USAGE = `Usage:
  fleethub devices [list] [--group G] [--version V] [--status online|offline] [--tag T] [--search TEXT] [--product P] [--limit N] [--offset N]
  fleethub devices show <device>        (id or identifier)
  fleethub devices updates <device>     update attempts, newest first
Options: --org O --json --url --token`;

export async function runDevicesCommand(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(
    argv,
    {
      ...ORG_OPTION,
      group: { type: 'string' },
      version: { type: 'string' },
      status: { type: 'string' },
      tag: { type: 'string' },
      search: { type: 'string' },
      product: { type: 'string' },
      limit: { type: 'string' },
      offset: { type: 'string' },
    },
    DEVICES_USAGE,
  );
  const help = helpRequested(values, DEVICES_USAGE, io);
  if (help !== undefined) return help;
  const client = clientFor(values, io);
  const org = await orgOf(client, values, io);
  const [sub = 'list', ref] = positionals;
  switch (sub) {
    case 'list': {
      const group = values.group
        ? (await client.get<{ id: string }>(`${orgPath(org)}/groups/${enc(values.group)}`)).id
        : undefined;
      const offset = Number(values.offset ?? 0);
      const page = await client.get<Page<Device>>(`${orgPath(org)}/devices`, {
        group,
        version: values.version,
        status: values.status,
        tag: values.tag,
        q: values.search,
        product: values.product,
        limit: values.limit,
        offset: values.offset,
      });
      if (values.json) printJson(io, page);
      else {
        printRows(io, false, page.items, DEVICE_COLUMNS, '(no devices)');
        footer(io, false, page, offset);
      }
      return 0;
    }
    case 'show': {
      if (!ref) throw usageError('devices show needs a device id or identifier', DEVICES_USAGE);
      const device = await client.get<Device & Record<string, unknown>>(`${orgPath(org)}/devices/${enc(ref)}`);
      printRecord(io, values.json, device);
      return 0;
    }
    case 'updates': {
      if (!ref) throw usageError('devices updates needs a device id or identifier', DEVICES_USAGE);
      const page = await client.get<Page<Attempt>>(`${orgPath(org)}/devices/${enc(ref)}/updates`, {
        limit: values.limit,
        offset: values.offset,
      });
      printRows(io, values.json, page.items, ATTEMPT_COLUMNS, '(no update attempts)');
      return 0;
    }
    default:
      throw usageError(`unknown subcommand ${JSON.stringify(sub)}`, DEVICES_USAGE);
  }
}

interface Attempt {
  id: string;
  device_id: string;
  from_version: string | null;
  to_version: string;
  state: string;
  percent: number | null;
  errors: string[];
  updated_at: string;
}
const ATTEMPT_COLUMNS: Column<Attempt>[] = [
  { header: 'state', value: (a) => a.state },
  { header: 'from', value: (a) => a.from_version },
  { header: 'to', value: (a) => a.to_version },
  { header: 'percent', value: (a) => a.percent },
  { header: 'updated', value: (a) => a.updated_at },
  { header: 'errors', value: (a) => a.errors },
];

// ---------------------------------------------------------------------------------------------

const GROUPS_USAGE = `Usage:
  fleethub groups [list] [--product P]
  fleethub groups create <name> --product P [--description D] [--priority N]
  fleethub groups show <group>
  fleethub groups members <group> [--limit N] [--offset N]
  fleethub groups add <group> <device>...       (device ids or identifiers)
  fleethub groups remove <group> <device>...
  fleethub groups delete <group>
Options: --org O --json --url --token`;

interface Group {
  id: string;
  name: string;
  product_id: string;
  description: string | null;
  priority: number;
  device_count: number;
  topic: string;
}

export async function runGroupsCommand(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(
    argv,
    {
      ...ORG_OPTION,
      product: { type: 'string' },
      description: { type: 'string' },
      priority: { type: 'string' },
      limit: { type: 'string' },
      offset: { type: 'string' },
    },
    GROUPS_USAGE,
  );
  const help = helpRequested(values, GROUPS_USAGE, io);
  if (help !== undefined) return help;
  const client = clientFor(values, io);
  const org = await orgOf(client, values, io);
  const [sub = 'list', name, ...devices] = positionals;
  const needName = () => {
    if (!name) throw usageError(`groups ${sub} needs a group name or id`, GROUPS_USAGE);
    return `${orgPath(org)}/groups/${enc(name)}`;
  };
  switch (sub) {
    case 'list': {
      const { items } = await client.get<{ items: Group[] }>(`${orgPath(org)}/groups`, { product: values.product });
      printRows(
        io,
        values.json,
        items,
        [
          { header: 'name', value: (g) => g.name },
          { header: 'devices', value: (g) => g.device_count },
          { header: 'priority', value: (g) => g.priority },
          { header: 'topic', value: (g) => g.topic },
          { header: 'id', value: (g) => g.id },
        ],
        '(no groups)',
      );
      return 0;
    }
    case 'create': {
      if (!name) throw usageError('groups create needs a name', GROUPS_USAGE);
      if (!values.product) throw usageError('groups create needs --product', GROUPS_USAGE);
      const priority = values.priority === undefined ? undefined : Number(values.priority);
      const group = await client.post<Group>(`${orgPath(org)}/groups`, {
        product: values.product,
        name,
        description: values.description,
        priority,
      });
      if (values.json) printJson(io, group);
      else io.out(`created group ${group.name} (${group.id})\n`);
      return 0;
    }
    case 'show':
      printRecord(io, values.json, await client.get<Record<string, unknown>>(needName()));
      return 0;
    case 'members': {
      const page = await client.get<Page<Device>>(`${needName()}/devices`, {
        limit: values.limit,
        offset: values.offset,
      });
      if (values.json) printJson(io, page);
      else {
        printRows(io, false, page.items, DEVICE_COLUMNS, '(no members)');
        footer(io, false, page, Number(values.offset ?? 0));
      }
      return 0;
    }
    case 'add':
    case 'remove': {
      const path = needName();
      if (devices.length === 0) throw usageError(`groups ${sub} needs at least one device`, GROUPS_USAGE);
      const result = await client.post<{ added?: string[]; removed?: string[] }>(
        sub === 'add' ? `${path}/devices` : `${path}/devices/remove`,
        { devices },
      );
      const changed = (sub === 'add' ? result.added : result.removed) ?? [];
      if (values.json) printJson(io, result);
      else
        io.out(
          `${sub === 'add' ? 'added' : 'removed'} ${changed.length} device(s) ${sub === 'add' ? 'to' : 'from'} ${name}${changed.length < devices.length ? ` (${devices.length - changed.length} already ${sub === 'add' ? 'in' : 'not in'} it)` : ''}\n`,
        );
      return 0;
    }
    case 'delete':
      await client.delete(needName());
      if (values.json) printJson(io, { ok: true });
      else io.out(`deleted group ${name}\n`);
      return 0;
    default:
      throw usageError(`unknown subcommand ${JSON.stringify(sub)}`, GROUPS_USAGE);
  }
}

// ---------------------------------------------------------------------------------------------

const FIRMWARE_USAGE = `Usage:
  fleethub firmware list [--product P] [--component C]
  fleethub firmware show <id>
  fleethub firmware delete <id>      (refused while a group or device targets it)
Uploads and signing keys: fleethub firmware upload | keys | sign | keygen --help
Options: --org O --json --url --token`;

interface FirmwareRow {
  id: string;
  version: string;
  component: string;
  product_id: string;
  platform: string | null;
  architecture: string | null;
  size: number | null;
  has_blob: boolean;
  uploaded_at: string;
}

/** `fleethub firmware list|show|delete` (uploads are server/cli/firmware.ts). */
export async function runFirmwareCommand(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(
    argv,
    { ...ORG_OPTION, product: { type: 'string' }, component: { type: 'string' } },
    FIRMWARE_USAGE,
  );
  const help = helpRequested(values, FIRMWARE_USAGE, io);
  if (help !== undefined) return help;
  const client = clientFor(values, io);
  const org = await orgOf(client, values, io);
  const [sub = 'list', id] = positionals;
  switch (sub) {
    case 'list': {
      const { items } = await client.get<{ items: FirmwareRow[] }>(`${orgPath(org)}/firmware`, {
        product: values.product,
        component: values.component,
      });
      printRows(
        io,
        values.json,
        items,
        [
          { header: 'version', value: (f) => f.version },
          { header: 'component', value: (f) => f.component },
          { header: 'platform', value: (f) => f.platform },
          { header: 'arch', value: (f) => f.architecture },
          { header: 'size', value: (f) => f.size },
          { header: 'image', value: (f) => (f.has_blob ? 'yes' : 'no') },
          { header: 'uploaded', value: (f) => f.uploaded_at },
          { header: 'id', value: (f) => f.id },
        ],
        '(no firmware)',
      );
      return 0;
    }
    case 'show':
      if (!id) throw usageError('firmware show needs the firmware id', FIRMWARE_USAGE);
      printRecord(io, values.json, await client.get<Record<string, unknown>>(`${orgPath(org)}/firmware/${enc(id)}`));
      return 0;
    case 'delete':
      if (!id) throw usageError('firmware delete needs the firmware id', FIRMWARE_USAGE);
      await client.delete(`${orgPath(org)}/firmware/${enc(id)}`);
      if (values.json) printJson(io, { ok: true });
      else io.out(`deleted firmware ${id}\n`);
      return 0;
    default:
      throw usageError(`unknown subcommand ${JSON.stringify(sub)}`, FIRMWARE_USAGE);
  }
}

// ---------------------------------------------------------------------------------------------

const TARGET_USAGE = `Usage:
  fleethub target set <version | firmware-id> (--group G | --device D) [--component C]
  fleethub target clear (--group G | --device D) [--component C]
Options: --org O --json --url --token`;

export async function runTargetCommand(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(
    argv,
    { ...ORG_OPTION, group: { type: 'string' }, device: { type: 'string' }, component: { type: 'string' } },
    TARGET_USAGE,
  );
  const help = helpRequested(values, TARGET_USAGE, io);
  if (help !== undefined) return help;
  if (Boolean(values.group) === Boolean(values.device))
    throw usageError('pass exactly one of --group or --device', TARGET_USAGE);
  const client = clientFor(values, io);
  const org = await orgOf(client, values, io);
  const scope = values.group ? `groups/${enc(values.group)}` : `devices/${enc(values.device!)}`;
  const what = values.group ? `group ${values.group}` : `device ${values.device}`;
  const [sub, firmware] = positionals;
  switch (sub) {
    case 'set': {
      if (!firmware) throw usageError('target set needs a version or firmware id', TARGET_USAGE);
      const isId = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(firmware);
      const body = isId ? { firmware_id: firmware } : { version: firmware, component: values.component };
      const change = await client.put<{ attempts: { sent: number; queued: number }; delivery: string }>(
        `${orgPath(org)}/${scope}/target`,
        body,
      );
      if (values.json) printJson(io, change);
      else
        io.out(
          `${what} now targets ${firmware}: ${change.attempts.sent} device(s) told now, ${change.attempts.queued} queued until they connect\n`,
        );
      return 0;
    }
    case 'clear':
      await client.delete(
        `${orgPath(org)}/${scope}/target${values.component ? `?component=${enc(values.component)}` : ''}`,
      );
      if (values.json) printJson(io, { ok: true });
      else io.out(`cleared the target of ${what}\n`);
      return 0;
    default:
      throw usageError(sub ? `unknown subcommand ${JSON.stringify(sub)}` : 'target needs set or clear', TARGET_USAGE);
  }
}

// ---------------------------------------------------------------------------------------------

const STATUS_USAGE = `Usage: fleethub status [--group G] [--watch]

Device counts by connection and running version, and update attempts by state, for the org or
one group. --watch redraws on every live event (operator socket), polling every 10 s as well.
Options: --org O --json --url --token`;

interface Status {
  devices: number;
  online: number;
  offline: number;
  versions: Record<string, number>;
  updates: Record<string, number>;
  target: { firmware_id: string } | null;
}

export async function runStatusCommand(argv: string[], io: CliIo): Promise<number> {
  const { values } = parseCommand(
    argv,
    { ...ORG_OPTION, group: { type: 'string' }, watch: { type: 'boolean' } },
    STATUS_USAGE,
  );
  const help = helpRequested(values, STATUS_USAGE, io);
  if (help !== undefined) return help;
  const client = clientFor(values, io);
  const org = await orgOf(client, values, io);
  const path = values.group ? `${orgPath(org)}/groups/${enc(values.group)}/status` : `${orgPath(org)}/status`;
  const render = async () => {
    const status = await client.get<Status>(path);
    if (values.json) return io.out(`${JSON.stringify(status)}\n`);
    if (values.watch && io === processIo && process.stdout.isTTY) io.out('\x1b[2J\x1b[H');
    io.out(formatStatus(status, values.group ?? org));
  };
  await render();
  if (values.watch) await watch(client, org, render, io);
  return 0;
}

function formatStatus(s: Status, scope: string): string {
  const lines = [
    `${scope}: ${s.devices} device(s), ${s.online} online, ${s.offline} offline`,
    '',
    'VERSION      DEVICES',
  ];
  for (const [v, n] of Object.entries(s.versions).sort((a, b) => b[1] - a[1])) lines.push(`${v.padEnd(12)} ${n}`);
  lines.push('', 'UPDATE STATE DEVICES');
  const states = Object.entries(s.updates).filter(([, n]) => n > 0);
  if (states.length === 0) lines.push('(no update attempts)');
  for (const [state, n] of states) lines.push(`${state.padEnd(12)} ${n}`);
  return `${lines.join('\n')}\n`;
}

/** Re-renders on every event of `operator:<orgId>` (and every 10 s) until Ctrl-C or `io.signal`. */
async function watch(client: ApiClient, org: string, render: () => Promise<void>, io: CliIo): Promise<void> {
  const { id: orgId } = await client.get<{ id: string }>(orgPath(org));
  let pending: NodeJS.Timeout | undefined;
  const refresh = () => {
    // Bursts of events (a group retarget) redraw once.
    pending ??= setTimeout(() => {
      pending = undefined;
      render().catch((err: Error) => io.err(`error: ${err.message}\n`));
    }, 200);
  };
  const socket = new Socket(`${client.options.url.replace(/^http/, 'ws')}/socket`, {
    transport: WebSocket as unknown as SocketConnectOption['transport'],
    authToken: client.options.token,
    reconnectAfterMs: (tries: number) => Math.min(10_000, 500 * tries),
  });
  socket.onError(() => undefined); // polling covers the gaps; phoenix reconnects by itself
  socket.connect();
  const channel = socket.channel(`operator:${orgId}`);
  channel.onMessage = (event: string, payload: unknown) => {
    if (!event.startsWith('phx_')) refresh();
    return payload;
  };
  channel
    .join()
    .receive('error', (resp: { reason?: string }) =>
      io.err(`live updates unavailable (${resp.reason ?? 'join refused'}); polling\n`),
    );
  const poll = setInterval(refresh, 10_000);
  try {
    await new Promise<void>((resolve) => {
      if (io.signal) {
        if (io.signal.aborted) return resolve();
        io.signal.addEventListener('abort', () => resolve(), { once: true });
      } else process.once('SIGINT', () => resolve());
    });
  } finally {
    clearInterval(poll);
    if (pending) clearTimeout(pending);
    await new Promise<void>((resolve) => socket.disconnect(() => resolve(), 1000, 'watch ended'));
  }
}
