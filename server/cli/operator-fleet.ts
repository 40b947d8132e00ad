/**
 * Operator CLI commands over the fleet: devices, groups, firmware records, targets, and status
 * (`--watch` for people, `--until` for scripts).
 */
import type { Command } from 'commander';
import { Socket, type SocketConnectOption } from 'phoenix';
import WebSocket from 'ws';
import type { operations, Schemas } from '../../client/index.ts';
import {
  CliError,
  listRange,
  orgSession,
  printJson,
  printRecord,
  printRows,
  usageError,
  type CliIo,
  type Column,
  type CommonFlags,
  type Session,
} from './client.ts';
import { act, type CliContext, type PageFlags, paged, withOrg } from './command.ts';
import { drawDeployment } from './deployment-view.ts';

type Device = Schemas['Device'];
const DEVICE_COLUMNS: Column<Device>[] = [
  { header: 'identifier', value: (d) => d.identifier },
  { header: 'status', value: (d) => d.connection_status },
  { header: 'version', value: (d) => d.firmware_version },
  { header: 'last seen', value: (d) => d.last_seen_at },
  { header: 'tags', value: (d) => d.tags },
  { header: 'id', value: (d) => d.id },
];

/** Under a table that shows part of a list (`--limit` / `--offset`): which part. */
function footer(io: CliIo, page: { items: unknown[]; total: number }, offset = 0): void {
  if (page.total > page.items.length)
    io.out(`(${offset + 1}-${offset + page.items.length} of ${page.total}; use --limit/--offset)\n`);
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
      const range = listRange(o);
      const { api, call, list, org } = await orgSession(o, io);
      const group = o.group
        ? (await call(api.GET('/api/v1/orgs/{org}/groups/{group}', { params: { path: { org, group: o.group } } }))).id
        : undefined;
      const filters = {
        group,
        version: o.version,
        status: o.status as 'online' | 'offline' | undefined,
        tag: o.tag,
        q: o.search,
        product: o.product,
      };
      const page = await list(
        (p) => api.GET('/api/v1/orgs/{org}/devices', { params: { path: { org }, query: { ...filters, ...p } } }),
        range,
      );
      if (o.json) return printJson(io, page);
      printRows(io, false, page.items, DEVICE_COLUMNS, '(no devices)');
      footer(io, page, range.offset);
    },
  );
  act<CommonFlags>(
    withOrg(devices.command('show').description('one device').argument('<device>', 'id or identifier')),
    ctx,
    async (o, [ref]) => {
      const { api, call, org } = await orgSession(o, io);
      printRecord(
        io,
        o.json,
        await call(
          api.GET('/api/v1/orgs/{org}/devices/{device}', { params: { path: { org, device: ref as string } } }),
        ),
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
      const range = listRange(o);
      const { api, list, org } = await orgSession(o, io);
      const page = await list(
        (p) =>
          api.GET('/api/v1/orgs/{org}/devices/{device}/updates', {
            params: { path: { org, device: ref as string }, query: p },
          }),
        range,
      );
      printRows(io, o.json, page.items, ATTEMPT_COLUMNS, '(no update attempts)');
      if (!o.json) footer(io, page, range.offset);
    },
  );
  return devices;
}

type Attempt = Schemas['UpdateAttempt'];
const ATTEMPT_COLUMNS: Column<Attempt>[] = [
  { header: 'state', value: (a) => a.state },
  { header: 'from', value: (a) => a.from_version },
  { header: 'to', value: (a) => a.to_version },
  { header: 'percent', value: (a) => a.percent },
  { header: 'updated', value: (a) => a.updated_at },
  { header: 'errors', value: (a) => a.errors },
];

// ---------------------------------------------------------------------------------------------

type MemberFlags = CommonFlags & { match?: string; tag?: string };

/** `fleethub groups`: list (the default), create, show, members, add, remove, delete. */
export function registerGroupsCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const groups = program.command('groups').description('groups of devices (each in one product)');
  /** The session, and the path parameters of the group named by the first argument. */
  const groupOf = async (o: CommonFlags, name: unknown) => {
    const session = await orgSession(o, io);
    return { ...session, path: { org: session.org, group: name as string } };
  };
  act<CommonFlags & PageFlags & { product?: string }>(
    paged(
      withOrg(
        groups
          .command('list', { isDefault: true })
          .description('groups with their member counts')
          .option('--product <product>', 'of this product only'),
      ),
    ),
    ctx,
    async (o) => {
      const range = listRange(o);
      const { api, list, org } = await orgSession(o, io);
      const { items } = await list(
        (p) => api.GET('/api/v1/orgs/{org}/groups', { params: { path: { org }, query: { ...p, product: o.product } } }),
        range,
      );
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
      const priority = o.priority === undefined ? undefined : Number(o.priority);
      if (priority !== undefined && !Number.isInteger(priority)) throw usageError('--priority must be an integer');
      const { api, call, org } = await orgSession(o, io);
      const group = await call(
        api.POST('/api/v1/orgs/{org}/groups', {
          params: { path: { org } },
          body: { product: o.product, name: name as string, description: o.description, priority },
        }),
      );
      if (o.json) printJson(io, group);
      else io.out(`created group ${group.name} (${group.id})\n`);
    },
  );
  act<CommonFlags>(
    withOrg(groups.command('show').description('one group').argument('<group>', 'name or id')),
    ctx,
    async (o, [name]) => {
      const { api, call, path } = await groupOf(o, name);
      printRecord(io, o.json, await call(api.GET('/api/v1/orgs/{org}/groups/{group}', { params: { path } })));
    },
  );
  act<CommonFlags & PageFlags>(
    paged(withOrg(groups.command('members').description("a group's devices").argument('<group>', 'name or id'))),
    ctx,
    async (o, [name]) => {
      const range = listRange(o);
      const { api, list, path } = await groupOf(o, name);
      const page = await list(
        (p) => api.GET('/api/v1/orgs/{org}/groups/{group}/devices', { params: { path, query: p } }),
        range,
      );
      if (o.json) return printJson(io, page);
      printRows(io, false, page.items, DEVICE_COLUMNS, '(no members)');
      footer(io, page, range.offset);
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
        const { api, call, path } = await groupOf(o, name);
        const body = { ...(devices.length ? { devices } : {}), match: o.match, tag: o.tag };
        const result =
          sub === 'add'
            ? await call(api.POST('/api/v1/orgs/{org}/groups/{group}/devices', { params: { path }, body }))
            : await call(api.POST('/api/v1/orgs/{org}/groups/{group}/devices/remove', { params: { path }, body }));
        const changed = ('added' in result ? result.added : 'removed' in result ? result.removed : undefined) ?? [];
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
      const { api, call, path } = await groupOf(o, name);
      await call(api.DELETE('/api/v1/orgs/{org}/groups/{group}', { params: { path } }));
      if (o.json) printJson(io, { ok: true });
      else io.out(`deleted group ${name as string}\n`);
    },
  );
}

// ---------------------------------------------------------------------------------------------

/** `fleethub firmware list|show|delete` (uploads and signing keys: server/cli/firmware.ts). */
export function registerFirmwareRecordCommands(program: Command, ctx: CliContext): Command {
  const { io } = ctx;
  const firmware = program.command('firmware').description('firmware: images, records, signing keys');
  act<CommonFlags & PageFlags & { product?: string; component?: string }>(
    paged(
      withOrg(
        firmware
          .command('list')
          .description(
            'firmware records, newest first: one row per variant (a release can have one per package format)',
          )
          .option('--product <product>', 'of this product only')
          .option('--component <component>', 'of this component only (default: all)'),
      ),
    ),
    ctx,
    async (o) => {
      const range = listRange(o);
      const { api, list, org } = await orgSession(o, io);
      const filters = { product: o.product, component: o.component };
      const { items } = await list(
        (p) => api.GET('/api/v1/orgs/{org}/firmware', { params: { path: { org }, query: { ...filters, ...p } } }),
        range,
      );
      printRows(
        io,
        o.json,
        items,
        [
          { header: 'version', value: (f) => f.version },
          { header: 'component', value: (f) => f.component },
          { header: 'format', value: (f) => f.format },
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
      const { api, call, org } = await orgSession(o, io);
      printRecord(
        io,
        o.json,
        await call(api.GET('/api/v1/orgs/{org}/firmware/{id}', { params: { path: { org, id: id as string } } })),
      );
    },
  );
  act<CommonFlags>(
    withOrg(
      firmware
        .command('delete')
        .description(
          'delete a firmware record and its image (refused while a group or device targets it, or a deployment rolled it out)',
        )
        .argument('<id>', 'firmware id'),
    ),
    ctx,
    async (o, [id]) => {
      const { api, call, org } = await orgSession(o, io);
      await call(api.DELETE('/api/v1/orgs/{org}/firmware/{id}', { params: { path: { org, id: id as string } } }));
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
    const { api, call, org } = await orgSession(o, io);
    const group = o.group ? { org, group: o.group } : undefined;
    const device = o.device ? { org, device: o.device } : undefined;
    return { api, call, group, device, what: o.group ? `group ${o.group}` : `device ${o.device}` };
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
      const { api, call, group, device, what } = await scopeOf(o);
      const ref = firmware as string;
      const isId = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(ref);
      const body = isId ? { firmware_id: ref } : { version: ref, component: o.component };
      const change = group
        ? await call(api.PUT('/api/v1/orgs/{org}/groups/{group}/target', { params: { path: group }, body }))
        : await call(api.PUT('/api/v1/orgs/{org}/devices/{device}/target', { params: { path: device! }, body }));
      if (o.json) return printJson(io, change);
      io.out(
        `${what} now targets ${ref}: ${change.attempts?.sent ?? 0} device(s) told now, ${change.attempts?.queued ?? 0} queued until they connect${change.already_running ? `, ${change.already_running} already run it` : ''}\n`,
      );
      if (change.deployment_id)
        io.out(`deployment ${change.deployment_id}; watch it: fleethub deployments watch ${change.deployment_id}\n`);
    },
  );
  act<TargetFlags>(
    targetScope(target.command('clear').description('clear the target (devices keep what they run)')),
    ctx,
    async (o) => {
      const { api, call, group, device, what } = await scopeOf(o);
      const query = { component: o.component };
      if (group) await call(api.DELETE('/api/v1/orgs/{org}/groups/{group}/target', { params: { path: group, query } }));
      else await call(api.DELETE('/api/v1/orgs/{org}/devices/{device}/target', { params: { path: device!, query } }));
      if (o.json) printJson(io, { ok: true });
      else io.out(`cleared the target of ${what}\n`);
    },
  );
}

// ---------------------------------------------------------------------------------------------

type Status = operations['getOrgStatus']['responses'][200]['content']['application/json'];
type DeviceTargetState = Schemas['DeviceTargetState'];

/** `status --until` gave up waiting (docs/cli.md: exit codes). */
export const EXIT_TIMEOUT = 3;

/** Attempt states after which a device will not reach the target by itself. */
const FAILED_STATES = ['failed', 'rolled_back', 'timed_out'] as const;
/** Sent to the device and not yet settled (queued ones wait for the device or the pacing). */
const IN_FLIGHT_STATES = ['sent', 'begun', 'downloading', 'finished'] as const;

const UNTIL_STATES = ['succeeded', 'online'] as const;
type UntilState = (typeof UNTIL_STATES)[number];

type StatusFlags = CommonFlags & {
  group?: string;
  deployment?: string;
  watch?: boolean;
  until?: string;
  timeout?: string;
  devices?: string;
  perDevice?: boolean;
  state?: string;
  component?: string;
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
        .option(
          '--deployment <id>',
          'one deployment (phased, or the one a group `target set` made): its per-stage and total per-device counts',
        )
        .option('--watch', 'follow changes: redraws in place on a terminal, else one line per change')
        .option(
          '--until <state>',
          `wait, then exit 0 (1 when an update failed, ${EXIT_TIMEOUT} on --timeout): succeeded (every member of --group runs its target) | online (every device is online)`,
        )
        .option('--timeout <seconds>', 'with --until: give up after this long (default: wait forever)')
        .option('--devices <n>', 'with --until: also wait until there are at least N devices (devices still enrolling)')
        .option(
          '--per-device',
          'a table of each device instead of the counts: its resolved target, running version and newest attempt',
        )
        .option('--state <state>', 'with --per-device: only devices in this state (e.g. failed, no_attempt)')
        .option('--component <component>', 'the component whose target is shown (default firmware)'),
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
  if (o.state !== undefined && !o.perDevice) throw usageError('--state goes with --per-device');
  if (o.perDevice && (o.watch || o.until !== undefined))
    throw usageError('--per-device prints the table once: it does not go with --watch or --until');
  if (o.deployment !== undefined && (o.group || o.perDevice || o.watch || o.until !== undefined))
    throw usageError(
      '--deployment prints that deployment once: it does not go with --group, --per-device, --watch or --until (follow it with `fleethub deployments watch`)',
    );
  const session = await orgSession(o, io);
  const { api, call, org } = session;
  if (o.perDevice) return perDeviceStatus(o, io, session);
  if (o.deployment !== undefined) {
    const d = await call(
      api.GET('/api/v1/orgs/{org}/deployments/{id}', { params: { path: { org, id: o.deployment } } }),
    );
    if (o.json) printJson(io, d);
    else io.out(drawDeployment(d));
    return 0;
  }
  const read = () =>
    call(
      api.GET('/api/v1/orgs/{org}/status', {
        params: { path: { org }, query: { group: o.group, ...(o.component ? { component: o.component } : {}) } },
      }),
    );
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
  const until = o.until === undefined ? undefined : untilCheck(o.until as UntilState, o.group, atLeast);
  if (!follow) {
    show(await read());
    return 0;
  }
  return watch(session, io, timeoutMs, async () => {
    const s = await read();
    show(s);
    const verdict = until?.check(s);
    if (verdict) io.err(`${verdict.message}\n`);
    return verdict?.code;
  }).then((code) => {
    if (code === EXIT_TIMEOUT) io.err(`timed out after ${o.timeout} s waiting for ${o.until}: ${until?.summary()}\n`);
    return code;
  });
}

/** `status --per-device`: every device of the org or group with its target and newest attempt. */
async function perDeviceStatus(o: StatusFlags, io: CliIo, session: Awaited<ReturnType<typeof orgSession>>) {
  const { api, list, org } = session;
  const query = {
    ...(o.group ? { group: o.group } : {}),
    ...(o.component ? { component: o.component } : {}),
    ...(o.state ? { state: o.state as DeviceTargetState['state'] } : {}),
  };
  const { items } = await list((p) =>
    api.GET('/api/v1/orgs/{org}/status/devices', { params: { path: { org }, query: { ...query, ...p } } }),
  );
  printRows(
    io,
    o.json,
    items,
    [
      { header: 'device', value: (d) => d.identifier },
      { header: 'protocol', value: (d) => d.protocol },
      { header: 'status', value: (d) => d.connection_status },
      { header: 'running', value: (d) => d.running_version ?? '-' },
      { header: 'target', value: (d) => d.target_version ?? '-' },
      { header: 'via', value: (d) => d.via ?? '-' },
      { header: 'state', value: (d) => d.state },
      {
        header: 'attempt',
        value: (d) =>
          d.attempt_state ? `${d.attempt_state}${d.attempt_percent === null ? '' : ` ${d.attempt_percent}%`}` : '-',
      },
      { header: 'updated', value: (d) => d.attempt_updated_at ?? '-' },
    ],
    o.state ? `(no device is ${o.state})` : '(no devices)',
  );
  return 0;
}

/**
 * The `--until` condition: a verdict (exit code and message) once it holds or cannot hold, else
 * undefined. `succeeded` judges each device against the firmware it resolves to (its own target,
 * else its groups' by priority), as the server's status counts it.
 */
function untilCheck(until: UntilState, group: string | undefined, atLeast: number) {
  let lastSummary = '';
  const check = (s: Status): { code: number; message: string } | undefined => {
    if (until === 'online') {
      lastSummary = `${s.online} of ${s.devices} device(s) online`;
      return s.devices >= atLeast && s.online === s.devices
        ? { code: 0, message: `every device is online (${s.devices})` }
        : undefined;
    }
    if (!s.target && s.targets.length === 0)
      throw new CliError(`group ${group} has no target: set one with \`fleethub target set\``);
    const running = s.targets.reduce((n, t) => n + t.running, 0);
    const versions = s.targets.map((t) => t.version);
    const what = versions.length === 1 ? versions[0] : `their targets (${targetCounts(s)})`;
    // Members the target does not concern (they do not run its component, or the release has no
    // variant their protocol installs) get no attempt and count as done.
    const notApplicable = s.device_states?.not_applicable ?? 0;
    lastSummary = `${running} of ${s.devices - notApplicable} device(s) run ${versions.length === 1 ? versions[0] : 'their target'}${notApplicable ? ` (${notApplicable} not applicable)` : ''}`;
    if (s.devices >= atLeast && running + notApplicable === s.devices)
      return { code: 0, message: `every device of ${group} runs ${what} (${running})` };
    const failed = FAILED_STATES.reduce((n, state) => n + (s.updates[state] ?? 0), 0);
    // Fail once the verdict is known for every device still being updated: a failure alone while
    // others download would name only the first devices to fail.
    const inFlight = IN_FLIGHT_STATES.reduce((n, state) => n + (s.updates[state] ?? 0), 0);
    if (failed > 0 && inFlight === 0) {
      const failedTo = [...new Set(s.failures.map((f) => f.version))].join(', ');
      return {
        code: 1,
        message: `${failed} device(s) of ${group} failed to update to ${failedTo}: ${s.failures
          .slice(0, 10)
          .map((f) => `${f.identifier} ${f.state}${f.errors.length ? ` (${f.errors[0]})` : ''}`)
          .join('; ')}${failed > 10 ? '; ...' : ''}`,
      };
    }
    return undefined;
  };
  return { check, summary: () => lastSummary };
}

/** `1.1.0 2/3, 1.2.0 1/1`: per resolved firmware, devices running it of those resolving to it. */
function targetCounts(s: Status): string {
  return s.targets.map((t) => `${t.version} ${t.running}/${t.devices}`).join(', ');
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
  const targets = s.targets.length ? `; on target ${targetCounts(s)}` : '';
  const t = s.target_deployment;
  const deployment = t ? `; deployment ${t.id} ${t.state} ${deploymentCounts(t.counts)}` : '';
  return `${scope}: ${s.devices} device(s), ${s.online} online; versions ${versions || '-'}; updates ${updates || '-'}${targets}${deployment}`;
}

/** A target deployment's per-device counts, in one phrase. */
function deploymentCounts(c: Schemas['DeploymentCounts']): string {
  return `${c.succeeded}/${c.total} succeeded, ${c.failed} failed, ${c.in_flight} in flight${c.cancelled ? `, ${c.cancelled} cancelled` : ''}`;
}

function formatStatus(s: Status, scope: string): string {
  const lines = [
    `${scope}: ${s.devices} device(s), ${s.online} online, ${s.offline} offline`,
    '',
    'VERSION      DEVICES',
  ];
  for (const [v, n] of Object.entries(s.versions).sort((a, b) => b[1] - a[1])) lines.push(`${v.padEnd(12)} ${n}`);
  if (s.targets.length) {
    lines.push('', 'TARGET       DEVICES  RUNNING IT');
    for (const t of s.targets) lines.push(`${t.version.padEnd(12)} ${String(t.devices).padEnd(8)} ${t.running}`);
  }
  const t = s.target_deployment;
  if (t)
    lines.push('', `DEPLOYMENT   ${t.id} (${t.version}, ${t.state.replace('_', ' ')}): ${deploymentCounts(t.counts)}`);
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
  { api, call, org, options }: Session & { org: string },
  io: CliIo,
  timeoutMs: number | undefined,
  step: () => Promise<number | undefined>,
): Promise<number> {
  const { id: orgId } = await call(api.GET('/api/v1/orgs/{org}', { params: { path: { org } } }));
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
  const socket = new Socket(`${options.url.replace(/^http/, 'ws')}/socket`, {
    transport: WebSocket as unknown as SocketConnectOption['transport'],
    authToken: options.token,
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
