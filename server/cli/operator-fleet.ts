/**
 * Operator CLI commands over the fleet: devices, groups, firmware records, targets, and status
 * (`--watch` for people, `--until` for scripts).
 */
import type { Command } from 'commander';
import { Socket, type SocketConnectOption } from 'phoenix';
import WebSocket from 'ws';
import {
  CliError,
  clientFor,
  orgOf,
  orgPath,
  printJson,
  printRecord,
  printRows,
  usageError,
  type ApiClient,
  type CliIo,
  type Column,
  type CommonFlags,
} from './client.ts';
import { act, type CliContext, withOrg } from './command.ts';

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

type PageFlags = { limit?: string; offset?: string };

function paged(cmd: Command): Command {
  return cmd.option('--limit <n>', 'rows per page (at most 1000; default 100)').option('--offset <n>', 'rows to skip');
}

// ---------------------------------------------------------------------------------------------

/** `fleethub devices`: list (the default), show, updates. */
export function registerDevicesCommands(program: Command, ctx: CliContext): Command {
  const { io } = ctx;
  const devices = program.command('devices').description('devices: list, show, update history');
  type ListFlags = CommonFlags &
    PageFlags & { group?: string; version?: string; status?: string; tag?: string; search?: string; product?: string };
  act<ListFlags>(
    paged(
      withOrg(
        devices
          .command('list', { isDefault: true })
          .description('devices of the org, newest first, with filters')
          .option('--group <group>', 'members of this group (name or id)')
          .option('--version <version>', 'running this firmware version')
          .option('--status <status>', 'online | offline')
          .option('--tag <tag>', 'carrying this tag')
          .option('--search <text>', 'identifier or description contains TEXT')
          .option('--product <product>', 'of this product (name or id)'),
      ),
    ),
    ctx,
    async (o) => {
      const client = clientFor(o, io);
      const org = await orgOf(client, o, io);
      const group = o.group
        ? (await client.get<{ id: string }>(`${orgPath(org)}/groups/${enc(o.group)}`)).id
        : undefined;
      const page = await client.get<Page<Device>>(`${orgPath(org)}/devices`, {
        group,
        version: o.version,
        status: o.status,
        tag: o.tag,
        q: o.search,
        product: o.product,
        limit: o.limit,
        offset: o.offset,
      });
      if (o.json) return printJson(io, page);
      printRows(io, false, page.items, DEVICE_COLUMNS, '(no devices)');
      footer(io, false, page, Number(o.offset ?? 0));
    },
  );
  act<CommonFlags>(
    withOrg(devices.command('show').description('one device').argument('<device>', 'id or identifier')),
    ctx,
    async (o, [ref]) => {
      const client = clientFor(o, io);
      const org = await orgOf(client, o, io);
      printRecord(
        io,
        o.json,
        await client.get<Device & Record<string, unknown>>(`${orgPath(org)}/devices/${enc(ref as string)}`),
      );
    },
  );
  act<CommonFlags & PageFlags>(
    paged(
      withOrg(
        devices
          .command('updates')
          .description("a device's update attempts, newest first")
          .argument('<device>', 'id or identifier'),
      ),
    ),
    ctx,
    async (o, [ref]) => {
      const client = clientFor(o, io);
      const org = await orgOf(client, o, io);
      const page = await client.get<Page<Attempt>>(`${orgPath(org)}/devices/${enc(ref as string)}/updates`, {
        limit: o.limit,
        offset: o.offset,
      });
      printRows(io, o.json, page.items, ATTEMPT_COLUMNS, '(no update attempts)');
    },
  );
  return devices;
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

interface Group {
  id: string;
  name: string;
  product_id: string;
  description: string | null;
  priority: number;
  device_count: number;
  topic: string;
}

type MemberFlags = CommonFlags & { match?: string; tag?: string };

/** `fleethub groups`: list (the default), create, show, members, add, remove, delete. */
export function registerGroupsCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const groups = program.command('groups').description('groups of devices (each in one product)');
  /** The client, and the API path of the group named by the first argument. */
  const groupPath = async (o: CommonFlags, name: unknown) => {
    const client = clientFor(o, io);
    return { client, path: `${orgPath(await orgOf(client, o, io))}/groups/${enc(name as string)}` };
  };
  act<CommonFlags & { product?: string }>(
    withOrg(
      groups
        .command('list', { isDefault: true })
        .description('groups with their member counts')
        .option('--product <product>', 'of this product only'),
    ),
    ctx,
    async (o) => {
      const client = clientFor(o, io);
      const { items } = await client.get<{ items: Group[] }>(`${orgPath(await orgOf(client, o, io))}/groups`, {
        product: o.product,
      });
      printRows(
        io,
        o.json,
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
    },
  );
  act<CommonFlags & { product: string; description?: string; priority?: string }>(
    withOrg(
      groups
        .command('create')
        .description('create a group')
        .argument('<name>')
        .requiredOption('--product <product>', 'the product its devices belong to (name or id)')
        .option('--description <text>', 'what the group is for')
        .option('--priority <n>', 'lower wins when groups target different firmware (default 100)'),
    ),
    ctx,
    async (o, [name]) => {
      const client = clientFor(o, io);
      const priority = o.priority === undefined ? undefined : Number(o.priority);
      if (priority !== undefined && !Number.isInteger(priority)) throw usageError('--priority must be an integer');
      const group = await client.post<Group>(`${orgPath(await orgOf(client, o, io))}/groups`, {
        product: o.product,
        name,
        description: o.description,
        priority,
      });
      if (o.json) printJson(io, group);
      else io.out(`created group ${group.name} (${group.id})\n`);
    },
  );
  act<CommonFlags>(
    withOrg(groups.command('show').description('one group').argument('<group>', 'name or id')),
    ctx,
    async (o, [name]) => {
      const { client, path } = await groupPath(o, name);
      printRecord(io, o.json, await client.get<Record<string, unknown>>(path));
    },
  );
  act<CommonFlags & PageFlags>(
    paged(withOrg(groups.command('members').description("a group's devices").argument('<group>', 'name or id'))),
    ctx,
    async (o, [name]) => {
      const { client, path } = await groupPath(o, name);
      const page = await client.get<Page<Device>>(`${path}/devices`, { limit: o.limit, offset: o.offset });
      if (o.json) return printJson(io, page);
      printRows(io, false, page.items, DEVICE_COLUMNS, '(no members)');
      footer(io, false, page, Number(o.offset ?? 0));
    },
  );
  for (const sub of ['add', 'remove'] as const) {
    act<MemberFlags>(
      withOrg(
        groups
          .command(sub)
          .description(
            sub === 'add'
              ? "add devices: named, or every device of the group's product matching --match / --tag"
              : 'remove devices: named, or those matching --match / --tag',
          )
          .argument('<group>', 'name or id')
          .argument('[devices...]', 'device ids or identifiers')
          .option('--match <glob>', "identifiers matching a glob: '*' any characters, '?' one (quote it)")
          .option('--tag <tag>', 'devices carrying this tag'),
      ),
      ctx,
      async (o, [name, named]) => {
        const devices = (named as string[] | undefined) ?? [];
        if (devices.length === 0 && o.match === undefined && o.tag === undefined)
          throw usageError(`groups ${sub} needs devices, --match or --tag`);
        const { client, path } = await groupPath(o, name);
        const result = await client.post<{ added?: string[]; removed?: string[] }>(
          sub === 'add' ? `${path}/devices` : `${path}/devices/remove`,
          { ...(devices.length ? { devices } : {}), match: o.match, tag: o.tag },
        );
        const changed = (sub === 'add' ? result.added : result.removed) ?? [];
        if (o.json) return printJson(io, result);
        const skipped = devices.length > changed.length && o.match === undefined && o.tag === undefined;
        io.out(
          `${sub === 'add' ? 'added' : 'removed'} ${changed.length} device(s) ${sub === 'add' ? 'to' : 'from'} ${name as string}${skipped ? ` (${devices.length - changed.length} already ${sub === 'add' ? 'in' : 'not in'} it)` : ''}\n`,
        );
      },
    );
  }
  act<CommonFlags>(
    withOrg(
      groups.command('delete').description('delete a group (members leave it)').argument('<group>', 'name or id'),
    ),
    ctx,
    async (o, [name]) => {
      const { client, path } = await groupPath(o, name);
      await client.delete(path);
      if (o.json) printJson(io, { ok: true });
      else io.out(`deleted group ${name as string}\n`);
    },
  );
}

// ---------------------------------------------------------------------------------------------

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

/** `fleethub firmware list|show|delete` (uploads and signing keys: server/cli/firmware.ts). */
export function registerFirmwareRecordCommands(program: Command, ctx: CliContext): Command {
  const { io } = ctx;
  const firmware = program.command('firmware').description('firmware: images, records, signing keys');
  act<CommonFlags & { product?: string; component?: string }>(
    withOrg(
      firmware
        .command('list')
        .description('firmware records, newest first')
        .option('--product <product>', 'of this product only')
        .option('--component <component>', 'of this component only (default: all)'),
    ),
    ctx,
    async (o) => {
      const client = clientFor(o, io);
      const { items } = await client.get<{ items: FirmwareRow[] }>(`${orgPath(await orgOf(client, o, io))}/firmware`, {
        product: o.product,
        component: o.component,
      });
      printRows(
        io,
        o.json,
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
    },
  );
  act<CommonFlags>(
    withOrg(firmware.command('show').description('one firmware record').argument('<id>', 'firmware id')),
    ctx,
    async (o, [id]) => {
      const client = clientFor(o, io);
      const org = await orgOf(client, o, io);
      printRecord(
        io,
        o.json,
        await client.get<Record<string, unknown>>(`${orgPath(org)}/firmware/${enc(id as string)}`),
      );
    },
  );
  act<CommonFlags>(
    withOrg(
      firmware
        .command('delete')
        .description('delete a firmware record and its image (refused while a group or device targets it)')
        .argument('<id>', 'firmware id'),
    ),
    ctx,
    async (o, [id]) => {
      const client = clientFor(o, io);
      await client.delete(`${orgPath(await orgOf(client, o, io))}/firmware/${enc(id as string)}`);
      if (o.json) printJson(io, { ok: true });
      else io.out(`deleted firmware ${id as string}\n`);
    },
  );
  return firmware;
}

// ---------------------------------------------------------------------------------------------

type TargetFlags = CommonFlags & { group?: string; device?: string; component?: string };

function targetScope(cmd: Command): Command {
  return withOrg(cmd)
    .option('--group <group>', 'the group (name or id)')
    .option('--device <device>', 'the device (id or identifier)')
    .option('--component <component>', 'the component (default firmware)');
}

/** `fleethub target set|clear` for a group or a device. */
export function registerTargetCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const target = program.command('target').description('the firmware a group or a device should run');
  const scopeOf = async (o: TargetFlags) => {
    if (Boolean(o.group) === Boolean(o.device)) throw usageError('pass exactly one of --group or --device');
    const client = clientFor(o, io);
    const org = await orgOf(client, o, io);
    return {
      client,
      path: `${orgPath(org)}/${o.group ? `groups/${enc(o.group)}` : `devices/${enc(o.device!)}`}/target`,
      what: o.group ? `group ${o.group}` : `device ${o.device}`,
    };
  };
  act<TargetFlags>(
    targetScope(
      target
        .command('set')
        .description('retarget: the devices are told at once, offline ones when they connect')
        .argument('<firmware>', 'version or firmware id'),
    ),
    ctx,
    async (o, [firmware]) => {
      const { client, path, what } = await scopeOf(o);
      const ref = firmware as string;
      const isId = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(ref);
      const change = await client.put<{ attempts: { sent: number; queued: number }; delivery: string }>(
        path,
        isId ? { firmware_id: ref } : { version: ref, component: o.component },
      );
      if (o.json) return printJson(io, change);
      io.out(
        `${what} now targets ${ref}: ${change.attempts.sent} device(s) told now, ${change.attempts.queued} queued until they connect\n`,
      );
    },
  );
  act<TargetFlags>(
    targetScope(target.command('clear').description('clear the target (devices keep what they run)')),
    ctx,
    async (o) => {
      const { client, path, what } = await scopeOf(o);
      await client.delete(`${path}${o.component ? `?component=${enc(o.component)}` : ''}`);
      if (o.json) printJson(io, { ok: true });
      else io.out(`cleared the target of ${what}\n`);
    },
  );
}

// ---------------------------------------------------------------------------------------------

interface Status {
  devices: number;
  online: number;
  offline: number;
  versions: Record<string, number>;
  updates: Record<string, number>;
  /** Devices per state with their target (one state per device; not_applicable: the target does not concern it). */
  device_states?: Record<string, number>;
  target: { firmware_id: string } | null;
}

/** `status --until` gave up waiting (docs/cli.md: exit codes). */
export const EXIT_TIMEOUT = 3;

/** Attempt states after which a device will not reach the target by itself. */
const FAILED_STATES = new Set(['failed', 'rolled_back', 'timed_out']);

const UNTIL_STATES = ['succeeded', 'online'] as const;
type UntilState = (typeof UNTIL_STATES)[number];

type StatusFlags = CommonFlags & {
  group?: string;
  watch?: boolean;
  until?: string;
  timeout?: string;
  devices?: string;
};

/** `fleethub status`: counts now, `--watch` as they change, `--until` for scripts. */
export function registerStatusCommand(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  act<StatusFlags>(
    withOrg(
      program
        .command('status')
        .description(
          'device counts by connection and running version, and update attempts by state, for the org or one group',
        )
        .option('--group <group>', 'one group (name or id)')
        .option('--watch', 'follow changes: redraws in place on a terminal, else one line per change')
        .option(
          '--until <state>',
          `wait, then exit 0 (1 when an update failed, ${EXIT_TIMEOUT} on --timeout): succeeded (every member of --group runs its target) | online (every device is online)`,
        )
        .option('--timeout <seconds>', 'with --until: give up after this long (default: wait forever)')
        .option(
          '--devices <n>',
          'with --until: also wait until there are at least N devices (devices still enrolling)',
        ),
    ),
    ctx,
    (o) => status(o, io),
  );
}

async function status(o: StatusFlags, io: CliIo): Promise<number> {
  if (o.until !== undefined && !UNTIL_STATES.includes(o.until as UntilState))
    throw usageError(`--until must be ${UNTIL_STATES.join(' or ')}, got ${JSON.stringify(o.until)}`);
  if (o.until === 'succeeded' && !o.group)
    throw usageError("--until succeeded needs --group (the target is a group's)");
  const timeoutMs = o.timeout === undefined ? undefined : Number(o.timeout) * 1000;
  if (timeoutMs !== undefined && !(timeoutMs > 0)) throw usageError('--timeout must be a positive number of seconds');
  if ((timeoutMs !== undefined || o.devices !== undefined) && o.until === undefined)
    throw usageError('--timeout and --devices go with --until');
  const atLeast = o.devices === undefined ? 1 : Number(o.devices);
  if (!Number.isInteger(atLeast) || atLeast < 1) throw usageError('--devices must be a whole number ≥ 1');
  const client = clientFor(o, io);
  const org = await orgOf(client, o, io);
  const path = o.group ? `${orgPath(org)}/groups/${enc(o.group)}/status` : `${orgPath(org)}/status`;
  const scope = o.group ?? org;
  const follow = o.watch || o.until !== undefined;
  const tty = Boolean(io.isTTY) && o.watch && !o.json;
  let drawnLines = 0;
  let lastLine = '';
  const show = (s: Status) => {
    if (o.json) {
      const line = JSON.stringify(s);
      if (follow && line === lastLine) return;
      lastLine = line;
      return io.out(`${line}\n`);
    }
    if (!follow) return io.out(formatStatus(s, scope));
    if (tty) {
      // In place: back to the first line of the last drawing, clear below, draw again.
      const text = formatStatus(s, scope);
      io.out(`${drawnLines ? `\x1b[${drawnLines}F\x1b[J` : ''}${text}`);
      drawnLines = text.split('\n').length - 1;
      return;
    }
    const line = statusLine(s, scope);
    if (line === lastLine) return;
    lastLine = line;
    io.out(`${new Date().toISOString()} ${line}\n`);
  };
  const until = o.until === undefined ? undefined : untilCheck(client, org, o.until as UntilState, o.group, atLeast);
  if (!follow) {
    show(await client.get<Status>(path));
    return 0;
  }
  return watch(client, org, io, timeoutMs, async () => {
    const s = await client.get<Status>(path);
    show(s);
    const verdict = await until?.check(s);
    if (verdict) io.err(`${verdict.message}\n`);
    return verdict?.code;
  }).then((code) => {
    if (code === EXIT_TIMEOUT) io.err(`timed out after ${o.timeout} s waiting for ${o.until}: ${until?.summary()}\n`);
    return code;
  });
}

/** The `--until` condition: a verdict (exit code and message) once it holds or cannot hold, else undefined. */
function untilCheck(client: ApiClient, org: string, until: UntilState, group: string | undefined, atLeast: number) {
  let lastSummary = '';
  let target: { id: string; version: string } | undefined;
  const check = async (s: Status): Promise<{ code: number; message: string } | undefined> => {
    if (until === 'online') {
      lastSummary = `${s.online} of ${s.devices} device(s) online`;
      return s.devices >= atLeast && s.online === s.devices
        ? { code: 0, message: `every device is online (${s.devices})` }
        : undefined;
    }
    if (!s.target) throw new CliError(`group ${group} has no target: set one with \`fleethub target set\``);
    if (target?.id !== s.target.firmware_id) {
      const fw = await client.get<{ version: string }>(`${orgPath(org)}/firmware/${enc(s.target.firmware_id)}`);
      target = { id: s.target.firmware_id, version: fw.version };
    }
    // Members the target does not concern (another component, no variant for their protocol) are done.
    const states = s.device_states ?? {};
    const notApplicable = states.not_applicable ?? 0;
    const running = s.device_states
      ? (states.succeeded ?? 0) + (states.up_to_date ?? 0)
      : (s.versions[target.version] ?? 0);
    lastSummary = `${running} of ${s.devices - notApplicable} device(s) run ${target.version}${notApplicable ? ` (${notApplicable} not applicable)` : ''}`;
    if (s.devices >= atLeast && running + notApplicable === s.devices)
      return { code: 0, message: `every device of ${group} runs ${target.version} (${running})` };
    const failed = await failedDevices(client, org, group!, target.version);
    if (failed.length)
      return {
        code: 1,
        message: `${failed.length} device(s) of ${group} failed to update to ${target.version}: ${failed
          .slice(0, 10)
          .map((a) => `${a.device} ${a.state}${a.errors?.length ? ` (${a.errors[0]})` : ''}`)
          .join('; ')}${failed.length > 10 ? '; ...' : ''}`,
      };
    return undefined;
  };
  return { check, summary: () => lastSummary };
}

/** Members (by identifier) whose latest update attempt is a failure at the target release (any of its variants). */
async function failedDevices(client: ApiClient, org: string, group: string, version: string) {
  const latest = new Map<string, Attempt & { component: string }>();
  for (let offset = 0; offset < 100_000; offset += 1000) {
    const page = await client.get<Page<Attempt & { component: string }>>(
      `${orgPath(org)}/groups/${enc(group)}/updates`,
      { limit: 1000, offset },
    );
    for (const a of page.items) if (a.component === 'firmware' && !latest.has(a.device_id)) latest.set(a.device_id, a);
    if (page.items.length < 1000) break;
  }
  const failed = [...latest.values()].filter((a) => a.to_version === version && FAILED_STATES.has(a.state));
  if (failed.length === 0) return [];
  const names = new Map<string, string>();
  for (let offset = 0; offset < 100_000; offset += 1000) {
    const page = await client.get<Page<Device>>(`${orgPath(org)}/groups/${enc(group)}/devices`, {
      limit: 1000,
      offset,
    });
    for (const d of page.items) names.set(d.id, d.identifier);
    if (page.items.length < 1000) break;
  }
  return failed.map((a) => ({ ...a, device: names.get(a.device_id) ?? a.device_id }));
}

/** One line of counts, for logs: `beta: 20 device(s), 20 online; 2.0.0=18 1.0.0=2; succeeded=18 downloading=2`. */
export function statusLine(s: Status, scope: string): string {
  const versions = Object.entries(s.versions)
    .sort((a, b) => b[1] - a[1])
    .map(([v, n]) => `${v}=${n}`)
    .join(' ');
  const updates = Object.entries(s.updates)
    .filter(([, n]) => n > 0)
    .map(([state, n]) => `${state}=${n}`)
    .join(' ');
  return `${scope}: ${s.devices} device(s), ${s.online} online; versions ${versions || '-'}; updates ${updates || '-'}`;
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

/**
 * Runs `step` now, on every event of `operator:<orgId>` and every 5 s, until it returns an exit
 * code, `timeoutMs` passes (EXIT_TIMEOUT), Ctrl-C or `io.signal` (0).
 */
export async function watch(
  client: ApiClient,
  org: string,
  io: CliIo,
  timeoutMs: number | undefined,
  step: () => Promise<number | undefined>,
): Promise<number> {
  const { id: orgId } = await client.get<{ id: string }>(orgPath(org));
  let finish!: (code: number) => void;
  const finished = new Promise<number>((resolve) => (finish = resolve));
  let running: Promise<void> | undefined;
  let again = false;
  let pending: NodeJS.Timeout | undefined;
  const run = () => {
    if (running) {
      again = true;
      return;
    }
    running = step()
      .then((code) => {
        if (code !== undefined) finish(code);
      })
      .catch((err: Error) => {
        if (err instanceof CliError) {
          io.err(`error: ${err.message}\n`);
          finish(err.exitCode);
        } else io.err(`error: ${err.message}\n`);
      })
      .finally(() => {
        running = undefined;
        if (again) {
          again = false;
          run();
        }
      });
  };
  // Bursts of events (a group retarget) redraw once.
  const refresh = () => {
    pending ??= setTimeout(() => {
      pending = undefined;
      run();
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
  channel.onMessage = (event: string | null, payload: unknown) => {
    // A push that timed out after its reply slot was cleared triggers with a null event.
    if (typeof event === 'string' && !event.startsWith('phx_')) refresh();
    return payload;
  };
  channel
    .join()
    .receive('error', (resp: { reason?: string }) =>
      io.err(`live updates unavailable (${resp.reason ?? 'join refused'}); polling\n`),
    );
  const poll = setInterval(refresh, 5_000);
  const timer = timeoutMs === undefined ? undefined : setTimeout(() => finish(EXIT_TIMEOUT), timeoutMs);
  const stop = () => finish(0);
  if (io.signal) {
    if (io.signal.aborted) finish(0);
    io.signal.addEventListener('abort', stop, { once: true });
  } else process.once('SIGINT', stop);
  run();
  try {
    return await finished;
  } finally {
    clearInterval(poll);
    if (timer) clearTimeout(timer);
    if (pending) clearTimeout(pending);
    io.signal?.removeEventListener('abort', stop);
    process.off('SIGINT', stop);
    await running;
    // Leaving stops the channel's join timeout and rejoin timer, which would otherwise fire after
    // the watch ended (and keep the process alive while they reschedule themselves).
    channel.leave(1000);
    await new Promise<void>((resolve) => socket.disconnect(() => resolve(), 1000, 'watch ended'));
  }
}
