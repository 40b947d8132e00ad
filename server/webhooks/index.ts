/**
 * Webhook deliveries: fleet events become persisted delivery rows (after the change that caused
 * them committed, through the fleet outbox's `onEvents`), and a worker on every node claims due
 * rows and POSTs them, signed, to the operators' receivers. A failed attempt is retried after
 * each delay of `retryDelaysMs`; a delivery that fails them all disables its webhook (audited).
 */
import { createHmac } from 'node:crypto';
import type { Db } from '../db/index.ts';
import type { FleetEvent } from '../fleet/context.ts';
import type { Logger } from '../log.ts';
import {
  claimDueDeliveries,
  nextDueAt,
  type ClaimedDelivery,
  decryptSecret,
  enqueueDeliveries,
  markAttemptFailed,
  markDelivered,
  orgsWithWebhooks,
  webhookEventOf,
} from './store.ts';

export const SIGNATURE_HEADER = 'fleethub-signature';

/**
 * `Fleethub-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the secret>`
 * (Stripe's scheme): the timestamp is signed with the body, so a receiver can refuse replays.
 */
export function signatureHeader(secret: string, body: string, at = new Date()): string {
  const t = Math.floor(at.getTime() / 1000);
  return `t=${t},v1=${createHmac('sha256', secret).update(`${t}.${body}`).digest('hex')}`;
}

/** Parses `10s,1m,5m,30m,2h,8h` (ms, s, m, h) into milliseconds. */
export function parseDelays(text: string): number[] {
  const unit: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  return text
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => {
      const m = /^(\d+)(ms|s|m|h)$/.exec(s);
      if (!m) throw new Error(`webhook retry delay ${JSON.stringify(s)} is not like 10s, 5m, 2h or 500ms`);
      return Number(m[1]) * unit[m[2]!]!;
    });
}

export const DEFAULT_RETRY_DELAYS = '10s,1m,5m,30m,2h,8h';

export interface WebhookServiceOptions {
  db: Db;
  log: Logger;
  /** The server secret: webhook secrets are stored encrypted under a key derived from it. */
  secret: string;
  /** Delay before each retry; a delivery gets `retryDelaysMs.length + 1` attempts. */
  retryDelaysMs?: number[];
  /** Per attempt (default 10 s). */
  timeoutMs?: number;
  /** Shortest wait before looking for due deliveries again (default 1 s, or the shortest retry delay). */
  pollMs?: number;
  /**
   * Longest wait with nothing due (default 30 s): deliveries queued on this node wake the worker
   * at once, retries wake it when they fall due; this poll only picks up what another node left.
   */
  idlePollMs?: number;
}

export interface WebhookService {
  /** The fleet outbox's hook: queues the events' deliveries (after their change committed). */
  onEvents(events: FleetEvent[]): Promise<void>;
  /** Call after webhooks change on this node, so the next event sees them at once. */
  invalidate(): void;
  /** The server secret webhooks' secrets are sealed with. */
  readonly secret: string;
  start(): void;
  stop(): Promise<void>;
}

/** How long the set of orgs with webhooks is trusted (other nodes' changes show up within this). */
const ORGS_TTL_MS = 5000;
const BATCH = 20;

export function createWebhookService(options: WebhookServiceOptions): WebhookService {
  const { db, log } = options;
  const delays = options.retryDelaysMs ?? parseDelays(DEFAULT_RETRY_DELAYS);
  const timeoutMs = options.timeoutMs ?? 10_000;
  const pollMs = options.pollMs ?? Math.max(20, Math.min(1000, ...delays));
  const idlePollMs = Math.max(pollMs, options.idlePollMs ?? 30_000);
  const leaseMs = timeoutMs + 30_000;
  let orgs: { set: Set<string>; at: number } | undefined;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> | undefined;
  let again = false;
  let stopped = true;
  const inFlight = new Set<AbortController>();

  async function orgsNow(): Promise<Set<string>> {
    if (!orgs || Date.now() - orgs.at > ORGS_TTL_MS) orgs = { set: await orgsWithWebhooks(db), at: Date.now() };
    return orgs.set;
  }

  async function attempt(d: ClaimedDelivery): Promise<void> {
    const body = JSON.stringify(d.payload);
    const controller = new AbortController();
    inFlight.add(controller);
    const timeout = setTimeout(() => controller.abort(), timeoutMs);
    let failure: { status: number | null; error: string };
    try {
      const res = await fetch(d.url, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          'user-agent': 'fleethub-webhooks/1',
          'fleethub-event': d.event,
          'fleethub-delivery': d.id,
          [SIGNATURE_HEADER]: signatureHeader(decryptSecret(options.secret, d.secret_enc), body),
        },
        body,
        redirect: 'manual',
        signal: controller.signal,
      });
      await res.body?.cancel().catch(() => undefined);
      if (res.status >= 200 && res.status < 300) {
        await markDelivered(db, d.id, res.status);
        log.debug({ delivery_id: d.id, webhook_id: d.webhook_id, status: res.status }, 'webhook delivered');
        return;
      }
      failure = { status: res.status, error: `receiver answered ${res.status}` };
    } catch (err) {
      const e = err as Error & { cause?: { code?: string; message?: string } };
      failure = {
        status: null,
        error: controller.signal.aborted
          ? `no answer within ${timeoutMs} ms`
          : (e.cause?.code ?? e.cause?.message ?? e.message),
      };
    } finally {
      clearTimeout(timeout);
      inFlight.delete(controller);
    }
    const outcome = await markAttemptFailed(db, d, failure, delays[d.attempts]);
    const fields = { delivery_id: d.id, webhook_id: d.webhook_id, attempt: d.attempts + 1, ...failure };
    if (outcome === 'disabled') {
      log.warn(fields, 'webhook disabled: a delivery failed every attempt');
      orgs = undefined;
    } else log.info(fields, 'webhook delivery failed; will retry');
  }

  /** Claims and sends batches until nothing is due; returns how long to wait before the next look. */
  async function drain(): Promise<number> {
    while (!stopped) {
      const due = await claimDueDeliveries(db, BATCH, leaseMs);
      if (due.length === 0) break;
      await Promise.all(due.map((d) => attempt(d)));
    }
    if (stopped) return idlePollMs;
    const next = await nextDueAt(db);
    if (!next) return idlePollMs;
    return Math.min(idlePollMs, Math.max(pollMs, next.getTime() - Date.now()));
  }

  function schedule(delay: number): void {
    if (stopped) return;
    clearTimeout(timer);
    timer = setTimeout(run, delay);
  }

  /** Something may be due now: look at once, or right after the look in progress. */
  function wake(): void {
    if (running) again = true;
    else schedule(0);
  }

  function run(): void {
    if (stopped || running) return;
    again = false;
    let wait = pollMs;
    running = drain()
      .then((ms) => {
        wait = ms;
      })
      .catch((err: unknown) => log.error({ err }, 'webhook delivery worker failed'))
      .finally(() => {
        running = undefined;
        schedule(again ? 0 : wait);
      });
  }

  return {
    secret: options.secret,
    async onEvents(events) {
      let queued = 0;
      for (const event of events) {
        const hook = webhookEventOf(event);
        if (!hook || !(await orgsNow()).has(hook.orgId)) continue;
        queued += await enqueueDeliveries(db, hook.orgId, hook.type, hook.data);
      }
      if (queued) wake();
    },
    invalidate() {
      orgs = undefined;
      // A webhook enabled again makes its waiting deliveries due.
      wake();
    },
    start() {
      if (!stopped) return;
      stopped = false;
      schedule(0);
    },
    async stop() {
      stopped = true;
      clearTimeout(timer);
      for (const c of inFlight) c.abort();
      await running;
    },
  };
}
