/**
 * `fleethub deployments create|list|show|devices|pause|resume|abort|approve|watch`: phased rollouts
 * (docs/deployments.md) through the generated API client. `watch` follows one until it ends and
 * exits with a status CI can wait on (docs/cli.md).
 */
import type { Command } from 'commander';
import type { components } from '../../client/schema.ts';
import {
  CliError,
  type CliIo,
  type CommonFlags,
  orgSession,
  printJson,
  printRecord,
  printRows,
  usageError,
} from './client.ts';
import { act, type CliContext, withOrg } from './command.ts';
import {
  countsText,
  deploymentLine,
  drawDeployment,
  headline,
  rateText,
  sizeText,
  stageName,
  stageState,
  thresholdText,
} from './deployment-view.ts';
import { EXIT_TIMEOUT, watch as watchOrg } from './operator-fleet.ts';

type Deployment = components['schemas']['Deployment'];
type Summary = components['schemas']['DeploymentSummary'];
type Threshold = components['schemas']['DeploymentThreshold'];

/** `deployments watch`: the deployment paused (its error condition, or an operator). */
export const EXIT_PAUSED = 4;
/** `deployments watch`: the deployment was aborted. */
export const EXIT_ABORTED = 5;
/** `deployments watch`: a target deployment was superseded (a newer target set of its group, or a clear). */
export const EXIT_SUPERSEDED = 6;

const STATES = ['draft', 'awaiting_approval', 'running', 'paused', 'completed', 'aborted', 'superseded'] as const;
const KINDS = ['phased', 'target'] as const;
const DEVICE_STATES = ['pending', 'in_flight', 'retrying', 'penalty_box', 'succeeded', 'failed', 'cancelled'] as const;

type Flags = CommonFlags & {
  product?: string;
  group?: string[];
  tag?: string[];
  versionRange?: string;
  platform?: string;
  architecture?: string;
  component?: string;
  name?: string;
  canary?: string;
  stage?: string[];
  successThreshold?: string;
  errorThreshold?: string;
  minFinished?: string;
  onError?: string;
  requireApproval?: boolean;
  soak?: string;
  maxConcurrent?: string;
  rate?: string;
  inFlightTimeout?: string;
  maxRate?: string;
  retries?: string;
  retryBackoff?: string;
  penalty?: string;
  draft?: boolean;
  watch?: boolean;
  timeout?: string;
  state?: string;
  kind?: string;
  reason?: string;
  limit?: string;
  offset?: string;
};

const collect = (v: string, prev: string[] = []) => [...prev, v];

// ---------------------------------------------------------------------------------------------
// Parsing the flags of `create`

/** `10` → `{count: 10}`, `10%` → `{percent: 10}`. */
export function parseThreshold(flag: string, value: string): Threshold {
  const m = /^\s*(\d+)\s*(%?)\s*$/.exec(value);
  if (!m)
    throw usageError(`${flag} takes a number of devices (10) or a percentage (10%), got ${JSON.stringify(value)}`);
  const n = Number(m[1]);
  return m[2] ? { percent: n } : { count: n };
}

/** A stage size: `10`, `10%` or `rest`. */
export function parseStageSize(flag: string, value: string): Threshold | 'rest' {
  if (/^\s*rest\s*$/i.test(value)) return 'rest';
  try {
    return parseThreshold(flag, value);
  } catch {
    throw usageError(
      `${flag} takes a number of devices (10), a percentage (50%) or rest, got ${JSON.stringify(value)}`,
    );
  }
}

/** `30/min` (also `30`, `2/s`, `120/h`) → devices per minute, a whole number ≥ 1. */
export function parseRate(value: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(?:\/\s*(s|sec|m|min|h|hour))?\s*$/i.exec(value);
  if (!m)
    throw usageError(`--rate takes devices per minute, e.g. 30/min (or 2/s, 120/h), got ${JSON.stringify(value)}`);
  const unit = (m[2] ?? 'min').toLowerCase();
  const perMinute = Number(m[1]) * (unit.startsWith('s') ? 60 : unit.startsWith('h') ? 1 / 60 : 1);
  if (!Number.isInteger(perMinute) || perMinute < 1)
    throw usageError(`--rate ${value} is ${perMinute} device(s) a minute: it must come to a whole number ≥ 1 a minute`);
  return perMinute;
}

type RateBody = NonNullable<components['schemas']['Deployment']['rate']>;

/**
 * `--rate`: `30/min` (also `30`, `2/s`, `120/h`) is a constant rate; `exp:BASE:FACTOR:CRITERION`
 * (optionally `:EVERY`) the exponential one, e.g. `exp:5:2:succeeded` — start at 5 a minute, double
 * each time another 5 devices succeeded. `--max-rate` caps the exponential one.
 */
export function parseRateFlag(value: string, maxRate?: string): { rate_per_minute: number } | { rate: RateBody } {
  const m = /^\s*exp(?:onential)?:(.*)$/i.exec(value);
  if (!m) {
    if (maxRate !== undefined)
      throw usageError('--max-rate goes with an exponential --rate (exp:BASE:FACTOR:CRITERION)');
    return { rate_per_minute: parseRate(value) };
  }
  const usage = `--rate exp:BASE:FACTOR:CRITERION[:EVERY] takes a whole BASE a minute, a FACTOR from 1.1 to 5, notified or succeeded, and optionally a whole EVERY; got ${JSON.stringify(value)}`;
  const parts = m[1]!.split(':').map((p) => p.trim());
  if (parts.length < 3 || parts.length > 4) throw usageError(usage);
  const [base, factor, criterion, every] = parts as [string, string, string, string | undefined];
  if (!/^\d+$/.test(base) || Number(base) < 1) throw usageError(usage);
  if (!/^\d+(\.\d+)?$/.test(factor) || Number(factor) < 1.1 || Number(factor) > 5) throw usageError(usage);
  if (criterion !== 'notified' && criterion !== 'succeeded') throw usageError(usage);
  if (every !== undefined && (!/^\d+$/.test(every) || Number(every) < 1)) throw usageError(usage);
  const max = maxRate === undefined ? undefined : parseRate(maxRate);
  return {
    rate: {
      type: 'exponential',
      base: Number(base),
      factor: Number(factor),
      criterion,
      ...(every !== undefined ? { every: Number(every) } : {}),
      ...(max !== undefined ? { max } : {}),
    },
  };
}

/** `--penalty N/WINDOW/HOLD`, e.g. `3/1h/30m`: failed 3 times within an hour → held out 30 minutes. */
export function parsePenalty(value: string): { failures: number; window_s: number; hold_s: number } {
  const parts = value.split('/');
  const usage = `--penalty takes FAILURES/WINDOW/HOLD, e.g. 3/1h/30m (3 failures within an hour: held out 30 minutes), got ${JSON.stringify(value)}`;
  if (parts.length !== 3 || !/^\s*\d+\s*$/.test(parts[0]!)) throw usageError(usage);
  const failures = Number(parts[0]);
  const window = parseDuration('--penalty WINDOW', parts[1]!);
  const hold = parseDuration('--penalty HOLD', parts[2]!);
  if (failures < 1 || window < 1 || hold < 1) throw usageError(usage);
  return { failures, window_s: window, hold_s: hold };
}

/** `90`, `90s`, `15m`, `2h` → seconds. */
export function parseDuration(flag: string, value: string): number {
  const m = /^\s*(\d+)\s*(s|m|h)?\s*$/i.exec(value);
  if (!m) throw usageError(`${flag} takes seconds (90) or a duration (90s, 15m, 2h), got ${JSON.stringify(value)}`);
  return Number(m[1]) * ({ s: 1, m: 60, h: 3600 }[(m[2] ?? 's').toLowerCase() as 's' | 'm' | 'h'] ?? 1);
}

function wholeNumber(flag: string, value: string | undefined, min = 0): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\s*\d+\s*$/.test(value) || n < min)
    throw usageError(`${flag} must be a whole number ≥ ${min}, got ${JSON.stringify(value)}`);
  return n;
}

/** The stages `--canary` and `--stage` describe, each with the thresholds, approval and soak flags. */
export function stagesOf(o: Flags): Array<Record<string, unknown>> | undefined {
  const sizes: Array<{ flag: string; size: Threshold | 'rest' }> = [];
  if (o.canary !== undefined) sizes.push({ flag: '--canary', size: parseStageSize('--canary', o.canary) });
  for (const s of o.stage ?? []) sizes.push({ flag: '--stage', size: parseStageSize('--stage', s) });
  const success =
    o.successThreshold === undefined ? undefined : parseThreshold('--success-threshold', o.successThreshold);
  const error = o.errorThreshold === undefined ? undefined : parseThreshold('--error-threshold', o.errorThreshold);
  const minFinished = wholeNumber('--min-finished', o.minFinished);
  const soak = o.soak === undefined ? undefined : parseDuration('--soak', o.soak);
  if (o.onError !== undefined && o.onError !== 'pause' && o.onError !== 'abort')
    throw usageError(`--on-error must be pause or abort, got ${JSON.stringify(o.onError)}`);
  if ((minFinished !== undefined || o.onError !== undefined) && !error)
    throw usageError('--min-finished and --on-error go with --error-threshold');
  const rest = sizes.findIndex((s) => s.size === 'rest');
  if (rest >= 0 && rest < sizes.length - 1) throw usageError('only the last stage can be `rest`');
  if (sizes.length === 0) {
    // One stage of every device: the flags still apply to it.
    if (!success && !error && !o.requireApproval && soak === undefined) return undefined;
    sizes.push({ flag: '--stage', size: 'rest' });
  }
  return sizes.map(({ size }, i) => ({
    size,
    ...(success ? { success } : {}),
    ...(error ? { error } : {}),
    ...(minFinished !== undefined ? { min_finished: minFinished } : {}),
    ...(o.onError ? { on_error: o.onError } : {}),
    ...(o.requireApproval && i > 0 ? { requires_approval: true } : {}),
    ...(soak !== undefined && i < sizes.length - 1 ? { soak_s: soak } : {}),
  }));
}

/** Which flag a field of the create body came from, for the server's validation errors. */
function flagOf(path: string, stages: number): string {
  const p = path.replace(/^body\/?/, '').split('/');
  const field = p[0] ?? '';
  if (field === 'stages' && p[1] !== undefined) {
    const i = Number(p[1]);
    const which = i === 0 && stages > 1 ? 'the canary' : `stage ${i + 1}`;
    const part = p[2];
    const flag =
      part === 'size'
        ? i === 0
          ? '--canary / --stage'
          : '--stage'
        : part === 'error'
          ? '--error-threshold'
          : part === 'success'
            ? '--success-threshold'
            : part === 'min_finished'
              ? '--min-finished'
              : part === 'soak_s'
                ? '--soak'
                : part === 'on_error'
                  ? '--on-error'
                  : '--stage';
    return `${flag} (${which})`;
  }
  const flags: Record<string, string> = {
    product: '--product',
    groups: '--group',
    tags: '--tag',
    version_range: '--version-range',
    platform: '--platform',
    architecture: '--architecture',
    component: '--component',
    name: '--name',
    version: '<version>',
    max_concurrent: '--max-concurrent',
    rate_per_minute: '--rate',
    rate: '--rate / --max-rate',
    in_flight_timeout_s: '--in-flight-timeout',
    retries: '--retries',
    retry_backoff_s: '--retry-backoff',
    penalty: '--penalty',
  };
  return flags[field] ?? (path || 'the request');
}

/** The server's refusal of a create, said in the command's terms. */
function explainRefusal(err: CliError, stages: number): CliError {
  const details = err.details as
    | { issues?: Array<{ path: string; message: string }>; overlapping_devices?: number; deployments?: string[] }
    | undefined;
  if (err.status === 400 && details?.issues?.length) {
    const lines = [...new Set(details.issues.map((i) => `  ${flagOf(i.path, stages)}: ${i.message}`))];
    return new CliError(
      `the server refused the deployment:\n${lines.join('\n')}`,
      1,
      err.status,
      err.code,
      err.details,
    );
  }
  if (err.status === 409 && details?.overlapping_devices !== undefined)
    return new CliError(
      `${err.message}\n${details.overlapping_devices} device(s) of this target set are in active deployment(s) ${(details.deployments ?? []).join(', ')}: narrow the target set (--tag, --version-range, ...) or finish or abort those first`,
      1,
      err.status,
      err.code,
      err.details,
    );
  return err;
}

function showDeployment(io: CliIo, d: Deployment): void {
  printRecord(io, false, {
    id: d.id,
    name: d.name,
    version: d.version,
    kind: d.kind,
    state: d.state,
    reason: d.state === 'paused' ? d.paused_reason : d.state === 'aborted' ? d.aborted_reason : null,
    stage: d.stages.length ? `${(d.current_stage ?? 0) + 1} of ${d.stages.length}` : null,
    devices: countsText(d.counts),
    max_concurrent: d.max_concurrent,
    rate: rateText(d),
    in_flight_timeout: d.in_flight_timeout_s ? `${d.in_flight_timeout_s} s` : null,
    retries: d.retries ? `${d.retries}, backoff ${d.retry_backoff_s} s doubling` : null,
    penalty_box: d.penalty_failures
      ? `${d.penalty_failures} failures within ${d.penalty_window_s} s: held out ${d.penalty_hold_s} s`
      : null,
    created: d.created_at,
    started: d.started_at,
    ended: d.ended_at,
  });
  io.out('\n');
  printRows(io, false, d.stages, [
    { header: 'stage', value: (s) => stageName(s, d.stages.length) },
    { header: 'devices', value: (s) => sizeText(s) },
    { header: 'told', value: (s) => s.told },
    { header: 'in flight', value: (s) => s.in_flight },
    { header: 'retrying', value: (s) => s.retrying },
    { header: 'penalty box', value: (s) => s.penalty_box },
    { header: 'succeeded', value: (s) => s.succeeded },
    { header: 'failed', value: (s) => s.failed },
    { header: 'success at', value: (s) => thresholdText(s.success) },
    {
      header: 'error at',
      value: (s) => (s.error ? `${thresholdText(s.error)} of ≥${s.min_finished} finished → ${s.on_error}` : '-'),
    },
    { header: 'approval', value: (s) => (s.requires_approval ? (s.approved_at ? 'approved' : 'required') : '-') },
    { header: 'soak', value: (s) => (s.soak_s ? `${s.soak_s} s` : '-') },
    { header: 'state', value: (s) => stageState(d, s) },
  ]);
}

// ---------------------------------------------------------------------------------------------
// Commands

export function registerDeploymentsCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const deployments = program
    .command('deployments')
    .description(
      'phased rollouts: a canary, stages, failure thresholds, pacing, pause/resume/abort (docs/deployments.md)',
    );
  const context = (o: Flags) => orgSession(o, io);
  /** A deployment by id, or by a name or id prefix (the newest match among the org's deployments). */
  const resolveId = async (o: Flags, ref: string): Promise<string> => {
    if (/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(ref)) return ref;
    const { call, api, org } = await context(o);
    const { items } = await call(
      api.GET('/api/v1/orgs/{org}/deployments', { params: { path: { org }, query: { limit: 1000 } } }),
    );
    const byName = items.filter((d) => d.name === ref);
    const matches = byName.length ? byName : items.filter((d) => d.id.startsWith(ref.toLowerCase()));
    if (matches.length === 0)
      throw new CliError(
        `no deployment named ${JSON.stringify(ref)} (or with an id starting so); list them with \`fleethub deployments list\``,
      );
    const active = matches.filter((d) => !['completed', 'aborted', 'superseded'].includes(d.state));
    if (active.length === 1) return active[0]!.id;
    if (matches.length === 1) return matches[0]!.id;
    throw new CliError(
      `${matches.length} deployments match ${JSON.stringify(ref)}: ${matches.map((d) => `${d.id} (${d.state})`).join(', ')}; use the id`,
      2,
    );
  };
  const withId = (name: string, description: string) =>
    withOrg(deployments.command(name).description(description).argument('<deployment>', 'id, name or id prefix'));
  const get = async (o: Flags, id: string) => {
    const { call, api, org } = await context(o);
    return call(api.GET('/api/v1/orgs/{org}/deployments/{id}', { params: { path: { org, id } } }));
  };

  act<Flags>(
    withOrg(
      deployments
        .command('create')
        .description('roll a firmware version out to groups in stages; prints the deployment (its id and stages)')
        .argument('<version>', 'the firmware version to roll out')
        .requiredOption('--group <group>', 'a group whose members are the target set; repeatable', collect)
        .option('--product <product>', "name or id (default: the first group's product)")
        .option('--tag <tag>', 'only devices with this tag; repeatable (every one must match)', collect)
        .option(
          '--version-range <range>',
          'only devices whose running version satisfies this semver range, e.g. "<2.0.0"',
        )
        .option('--platform <platform>', 'only devices of this platform')
        .option('--architecture <arch>', 'only devices of this architecture')
        .option('--component <component>', 'the component (default firmware)')
        .option('--name <name>', 'a name to refer to it by (show, watch, ...)')
        .option('--canary <n|p%>', 'the first stage: N devices or a percentage')
        .option(
          '--stage <n|p%|rest>',
          'the next stage (repeatable, in order); the last one takes every device left',
          collect,
        )
        .option(
          '--success-threshold <n|p%>',
          'each stage succeeds once this many of its devices succeeded (default 100%)',
        )
        .option('--error-threshold <n|p%>', 'each stage trips once this many of its finished devices failed')
        .option('--min-finished <n>', 'with --error-threshold: judged only once this many of the stage finished')
        .option('--on-error <action>', 'with --error-threshold: pause (default) or abort')
        .option('--require-approval', 'each stage after the first waits for `fleethub deployments approve`')
        .option('--soak <duration>', 'wait this long after a stage succeeded before the next (90s, 15m, 2h)')
        .option('--max-concurrent <n>', 'at most this many devices updating at once')
        .option(
          '--rate <rate>',
          'tell at most this many devices a minute (30/min, 2/s, 120/h), or exponential: exp:BASE:FACTOR:notified|succeeded[:EVERY]',
        )
        .option('--max-rate <n/min>', 'with an exponential --rate: never more than this a minute')
        .option('--in-flight-timeout <duration>', 'an update with no word from its device for this long fails')
        .option('--retries <n>', 'tell a device whose update failed or timed out again, up to this many times')
        .option(
          '--retry-backoff <duration>',
          'with --retries: wait this long before the first retry, doubling (default 60s)',
        )
        .option(
          '--penalty <n/window/hold>',
          'with --retries: N failures within WINDOW hold a device out for HOLD (3/1h/30m)',
        )
        .option('--draft', 'create it without starting (`fleethub deployments resume` starts it)')
        .option('--watch', 'then watch it as `deployments watch` does (and exit as it does)')
        .option('--timeout <seconds>', 'with --watch: give up after this long'),
    ),
    ctx,
    async (o, [version]) => {
      const stages = stagesOf(o);
      if (o.maxRate !== undefined && o.rate === undefined) throw usageError('--max-rate goes with --rate exp:…');
      const rate = o.rate === undefined ? undefined : parseRateFlag(o.rate, o.maxRate);
      const maxConcurrent = wholeNumber('--max-concurrent', o.maxConcurrent, 1);
      const retries = wholeNumber('--retries', o.retries);
      const backoff = o.retryBackoff === undefined ? undefined : parseDuration('--retry-backoff', o.retryBackoff);
      const penalty = o.penalty === undefined ? undefined : parsePenalty(o.penalty);
      if ((backoff !== undefined || penalty !== undefined) && !retries)
        throw usageError(
          '--retry-backoff and --penalty go with --retries (a held-out device is retried after its hold)',
        );
      const inFlight =
        o.inFlightTimeout === undefined ? undefined : parseDuration('--in-flight-timeout', o.inFlightTimeout);
      if (o.timeout !== undefined && !o.watch) throw usageError('--timeout goes with --watch');
      const timeoutMs = timeoutOf(o.timeout);
      const { call, api, org } = await context(o);
      const groups = o.group!;
      let product = o.product;
      if (!product) {
        const group = await call(
          api.GET('/api/v1/orgs/{org}/groups/{group}', { params: { path: { org, group: groups[0]! } } }),
        );
        product = group.product_id;
        if (!product) throw new CliError(`group ${groups[0]} has no product: pass --product`);
      }
      const created = await call(
        api.POST('/api/v1/orgs/{org}/deployments', {
          params: { path: { org } },
          body: {
            product,
            version: version as string,
            groups,
            ...(o.tag ? { tags: o.tag } : {}),
            ...(o.versionRange ? { version_range: o.versionRange } : {}),
            ...(o.platform ? { platform: o.platform } : {}),
            ...(o.architecture ? { architecture: o.architecture } : {}),
            ...(o.component ? { component: o.component } : {}),
            ...(o.name ? { name: o.name } : {}),
            ...(stages ? { stages: stages as never } : {}),
            ...(maxConcurrent !== undefined ? { max_concurrent: maxConcurrent } : {}),
            ...(rate ?? {}),
            ...(inFlight !== undefined ? { in_flight_timeout_s: inFlight } : {}),
            ...(retries !== undefined ? { retries } : {}),
            ...(backoff !== undefined ? { retry_backoff_s: backoff } : {}),
            ...(penalty ? { penalty } : {}),
            ...(o.draft ? { start: false } : {}),
          },
        }),
      ).catch((err: unknown) => {
        throw err instanceof CliError ? explainRefusal(err, stages?.length ?? 1) : err;
      });
      if (o.json) printJson(io, created);
      else {
        io.out(`created deployment ${created.id}${created.name ? ` (${created.name})` : ''}\n`);
        if (created.already_running) io.out(`${created.already_running} device(s) already run ${version}: left out\n`);
        if (!o.watch) showDeployment(io, created);
      }
      if (o.watch) return watchDeployment(io, o, created.id, timeoutMs, (id) => get(o, id));
    },
  );

  act<Flags>(
    withOrg(
      deployments
        .command('list', { isDefault: true })
        .description("the org's deployments, newest first, with their per-device counts")
        .option('--state <state>', STATES.join(' | '))
        .option('--kind <kind>', 'phased (created as deployments) | target (made by `fleethub target set --group`)')
        .option('--limit <n>', 'how many (default 100)')
        .option('--offset <n>', 'skip this many'),
    ),
    ctx,
    async (o) => {
      const state = o.state as (typeof STATES)[number] | undefined;
      if (state && !STATES.includes(state))
        throw usageError(`--state must be one of ${STATES.join(', ')}, not ${state}`);
      const kind = o.kind as (typeof KINDS)[number] | undefined;
      if (kind && !KINDS.includes(kind)) throw usageError(`--kind must be one of ${KINDS.join(', ')}, not ${kind}`);
      const { call, api, org } = await context(o);
      const page = await call(
        api.GET('/api/v1/orgs/{org}/deployments', {
          params: {
            path: { org },
            query: {
              state,
              kind,
              limit: wholeNumber('--limit', o.limit, 1) ?? 100,
              offset: wholeNumber('--offset', o.offset) ?? 0,
            },
          },
        }),
      );
      if (o.json) return printJson(io, page);
      printRows(io, false, page.items, [
        { header: 'id', value: (d: Summary) => d.id },
        { header: 'kind', value: (d) => d.kind },
        { header: 'name', value: (d) => d.name },
        { header: 'version', value: (d) => d.version },
        { header: 'state', value: (d) => d.state },
        { header: 'stage', value: (d) => (d.current_stage ?? 0) + 1 },
        { header: 'devices', value: (d) => d.counts.total },
        { header: 'told', value: (d) => d.counts.told },
        { header: 'succeeded', value: (d) => d.counts.succeeded },
        { header: 'failed', value: (d) => d.counts.failed },
        { header: 'created', value: (d) => d.created_at },
      ]);
      if (page.total > page.items.length) io.out(`${page.items.length} of ${page.total}\n`);
    },
  );

  act<Flags>(
    withId('show', 'one deployment: its settings and each stage with its per-device counts'),
    ctx,
    async (o, [ref]) => {
      const d = await get(o, await resolveId(o, ref as string));
      if (o.json) return printJson(io, d);
      showDeployment(io, d);
    },
  );

  act<Flags>(
    withId('devices', 'the devices of a deployment in stage order, with their state')
      .option('--state <state>', DEVICE_STATES.join(' | '))
      .option('--stage <n>', 'only this stage (1 = the first)')
      .option('--limit <n>', 'how many (default 100)')
      .option('--offset <n>', 'skip this many'),
    ctx,
    async (o, [ref]) => {
      const state = o.state as (typeof DEVICE_STATES)[number] | undefined;
      if (state && !DEVICE_STATES.includes(state))
        throw usageError(`--state must be one of ${DEVICE_STATES.join(', ')}, not ${state}`);
      const stage = wholeNumber('--stage', (o as { stage?: unknown }).stage as string | undefined, 1);
      const id = await resolveId(o, ref as string);
      const { call, api, org } = await context(o);
      const page = await call(
        api.GET('/api/v1/orgs/{org}/deployments/{id}/devices', {
          params: {
            path: { org, id },
            query: {
              state,
              ...(stage !== undefined ? { stage: stage - 1 } : {}),
              limit: wholeNumber('--limit', o.limit, 1) ?? 100,
              offset: wholeNumber('--offset', o.offset) ?? 0,
            },
          },
        }),
      );
      if (o.json) return printJson(io, page);
      printRows(io, false, page.items, [
        { header: 'device', value: (d) => d.identifier ?? d.device_id },
        { header: 'protocol', value: (d) => d.protocol },
        { header: 'stage', value: (d) => d.stage + 1 },
        { header: 'state', value: (d) => d.state },
        { header: 'tries', value: (d) => d.tries },
        { header: 'told', value: (d) => d.told_at },
        { header: 'retry at', value: (d) => d.retry_at },
        { header: 'reason', value: (d) => d.failure_reason },
      ]);
      io.out(`${page.items.length} of ${page.total}\n`);
    },
  );

  const actions = [
    ['pause', 'stop telling devices; those in flight finish and are counted'],
    ['resume', 'continue a paused deployment where it stopped (past a tripped error condition), or start a draft'],
    ['abort', 'stop for good: nobody new is told, updates in flight are cancelled'],
    ['approve', 'start the stage waiting for approval'],
  ] as const;
  for (const [name, description] of actions) {
    const cmd = withId(name, description);
    if (name === 'pause' || name === 'abort') cmd.option('--reason <text>', 'why, for the audit trail and `show`');
    act<Flags>(cmd, ctx, async (o, [ref]) => {
      const id = await resolveId(o, ref as string);
      const { call, api, org } = await context(o);
      const params = { params: { path: { org, id } } };
      const body = o.reason ? { body: { reason: o.reason } } : { body: {} };
      const d = await call(
        name === 'pause'
          ? api.POST('/api/v1/orgs/{org}/deployments/{id}/pause', { ...params, ...body })
          : name === 'abort'
            ? api.POST('/api/v1/orgs/{org}/deployments/{id}/abort', { ...params, ...body })
            : name === 'resume'
              ? api.POST('/api/v1/orgs/{org}/deployments/{id}/resume', params)
              : api.POST('/api/v1/orgs/{org}/deployments/{id}/approve', params),
      );
      if (o.json) return printJson(io, d);
      io.out(`${headline(d)}\n`);
    });
  }

  act<Flags>(
    withId(
      'watch',
      `follow a deployment until it ends: a progress bar per stage on a terminal, a line per change otherwise; exits 0 completed, ${EXIT_PAUSED} paused, ${EXIT_ABORTED} aborted, ${EXIT_SUPERSEDED} superseded (a target deployment), ${EXIT_TIMEOUT} on --timeout`,
    ).option('--timeout <seconds>', 'give up after this long (default: wait forever)'),
    ctx,
    async (o, [ref]) => {
      const timeoutMs = timeoutOf(o.timeout);
      const id = await resolveId(o, ref as string);
      return watchDeployment(io, o, id, timeoutMs, (x) => get(o, x));
    },
  );
}

function timeoutOf(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const ms = Number(value) * 1000;
  if (!(ms > 0)) throw usageError('--timeout must be a positive number of seconds');
  return ms;
}

/** The exit code a deployment's state ends `watch` with, or undefined while it goes on. */
export function watchVerdict(state: Deployment['state']): number | undefined {
  if (state === 'completed') return 0;
  if (state === 'paused') return EXIT_PAUSED;
  if (state === 'aborted') return EXIT_ABORTED;
  if (state === 'superseded') return EXIT_SUPERSEDED;
  return undefined;
}

/**
 * Redraws (terminal) or prints a line per change until the deployment completes, pauses or is
 * aborted; wakes on every event of the operator socket and polls every 5 s.
 */
async function watchDeployment(
  io: CliIo,
  o: Flags,
  id: string,
  timeoutMs: number | undefined,
  get: (id: string) => Promise<Deployment>,
): Promise<number> {
  const session = await orgSession(o, io);
  const tty = Boolean(io.isTTY) && !o.json;
  let drawn = 0;
  let last = '';
  let latest: Deployment | undefined;
  let approvalHinted = -1;
  let ended: number | undefined;
  const code = await watchOrg(session, io, timeoutMs, async () => {
    // A refresh queued before the end must not print the end again.
    if (ended !== undefined) return ended;
    const d = await get(id);
    latest = d;
    if (o.json) {
      const line = JSON.stringify(d);
      if (line !== last) io.out(`${line}\n`);
      last = line;
    } else if (tty) {
      const text = drawDeployment(d);
      io.out(`${drawn ? `\x1b[${drawn}F\x1b[J` : ''}${text}`);
      drawn = text.split('\n').length - 1;
    } else {
      const line = deploymentLine(d);
      if (line !== last) io.out(`${new Date().toISOString()} ${line}\n`);
      last = line;
    }
    if (d.state === 'awaiting_approval' && approvalHinted !== (d.current_stage ?? 0)) {
      approvalHinted = d.current_stage ?? 0;
      io.err(`stage ${(d.current_stage ?? 0) + 1} waits for approval: fleethub deployments approve ${d.id}\n`);
    }
    const verdict = watchVerdict(d.state);
    if (verdict === undefined) return undefined;
    ended = verdict;
    const c = d.counts;
    io.err(
      d.state === 'completed'
        ? `completed: ${c.succeeded} of ${c.total} device(s) succeeded, ${c.failed} failed\n`
        : d.state === 'paused'
          ? `paused at stage ${(d.current_stage ?? 0) + 1}${d.paused_reason ? `: ${d.paused_reason}` : ''} (${c.succeeded} succeeded, ${c.failed} failed, ${c.pending} not told); \`fleethub deployments resume ${d.id}\` continues\n`
          : d.state === 'superseded'
            ? `superseded: its group got another target, or the target was cleared (${c.succeeded} succeeded, ${c.failed} failed, ${c.cancelled} cancelled); \`fleethub status --group\` shows the current one\n`
            : `aborted${d.aborted_reason ? `: ${d.aborted_reason}` : ''} (${c.succeeded} succeeded, ${c.failed} failed, ${c.cancelled} cancelled, ${c.pending} never told)\n`,
    );
    return verdict;
  });
  if (code === EXIT_TIMEOUT)
    io.err(
      `timed out after ${o.timeout} s; the deployment is ${latest ? latest.state.replace('_', ' ') : 'unknown'}\n`,
    );
  return code;
}
