/**
 * The one transition table of update attempts, for every protocol. Nothing else decides which
 * state an attempt may move to: the device link (device-link.ts), the set-based statements
 * (reconcile, settle on join, the timeout sweep, the progress batch) and the operator paths all
 * read their `from` lists here.
 *
 *   queued → sent → begun → downloading → finished → succeeded | rolled_back
 *   (any open state) → failed (device error) | timed_out (sweep) | cancelled (superseded, revoked)
 */
import { sql, type RawBuilder } from 'kysely';
import type { UpdateState } from '../db/schema.ts';

export const UPDATE_STATES: readonly UpdateState[] = [
  'queued',
  'sent',
  'begun',
  'downloading',
  'finished',
  'succeeded',
  'failed',
  'rolled_back',
  'timed_out',
  'cancelled',
];

/** States of an attempt that is still in flight (anything else is final). */
export const OPEN_STATES = ['queued', 'sent', 'begun', 'downloading', 'finished'] as const;
/** Final states: an attempt that reached one never moves again. */
export const FINAL_STATES: readonly UpdateState[] = ['succeeded', 'failed', 'rolled_back', 'timed_out', 'cancelled'];
/** Open states before the device wrote the image: an update here may still be (re)sent. */
export const UNFINISHED_STATES = ['queued', 'sent', 'begun', 'downloading'] as const;

/** What can happen to an attempt; each protocol's events map onto these (device-link.ts). */
export type AttemptEvent =
  | 'send'
  | 'begin'
  | 'progress'
  | 'finish'
  | 'fail'
  | 'decline'
  | 'confirm'
  | 'roll_back'
  | 'time_out'
  | 'cancel';

export interface Transition {
  from: readonly UpdateState[];
  to: UpdateState;
}

/** The table: which states each event may move an attempt from, and where to. */
export const TRANSITIONS: Readonly<Record<AttemptEvent, Transition>> = {
  /** The update command went out (again, after a reconnect: an update underway is sent anew). */
  send: { from: UNFINISHED_STATES, to: 'sent' },
  begin: { from: ['queued', 'sent'], to: 'begun' },
  progress: { from: ['begun', 'downloading'], to: 'downloading' },
  finish: { from: ['begun', 'downloading'], to: 'finished' },
  fail: { from: OPEN_STATES, to: 'failed' },
  /** The device refused the update before starting it. */
  decline: { from: ['queued', 'sent'], to: 'failed' },
  /** The device runs (and, where the protocol has the step, validated) the attempt's firmware. */
  confirm: { from: OPEN_STATES, to: 'succeeded' },
  /** The device came back on other firmware after the install, or reported restoring its backup. */
  roll_back: { from: OPEN_STATES, to: 'rolled_back' },
  /** No word from the device within the in-flight timeout (`queued` waits for its device). */
  time_out: { from: ['sent', 'begun', 'downloading', 'finished'], to: 'timed_out' },
  /** Superseded by another target, or the device was revoked. */
  cancel: { from: OPEN_STATES, to: 'cancelled' },
};

/** Events that carry a download on: on an update sent again mid-download they resume it (`stepsOf`). */
export const RESUMING_EVENTS: readonly AttemptEvent[] = ['progress', 'finish'];

/**
 * The moves of the table one event makes on an attempt, in order: the event's own, except on
 * resume. A device that reconnects mid-download (a server restart, a network outage) is sent its
 * update again (`send`: `sent` once more), and carries on with the download it had begun: a
 * progress or finish on a `sent` attempt whose download had begun (`begun_at` set) is first a
 * `begin`, then its own move. An attempt whose download never began gets no such help: a progress
 * or finish on it is refused (the device must report its begin first).
 */
export function stepsOf(event: AttemptEvent, attempt: { state: UpdateState; begun_at: unknown }): AttemptEvent[] {
  const resumes = RESUMING_EVENTS.includes(event) && attempt.state === 'sent' && attempt.begun_at != null;
  return resumes ? ['begin', event] : [event];
}

/** The state `event` moves an attempt in `from` to, or undefined when the table has no such move. */
export function transitionOf(event: AttemptEvent, from: UpdateState): UpdateState | undefined {
  const t = TRANSITIONS[event];
  return t.from.includes(from) ? t.to : undefined;
}

/** Whether some event moves an attempt from `from` to `to` (the property test checks every write against this). */
export function isAllowedTransition(from: UpdateState, to: UpdateState): boolean {
  return Object.values(TRANSITIONS).some((t) => t.to === to && t.from.includes(from));
}

/**
 * Whether one event may take an attempt from `from` to `to`: a move of the table, or a `begin`
 * followed by a move (a resumed download, or a protocol without a begin message).
 */
export function isAllowedEventMove(from: UpdateState, to: UpdateState): boolean {
  const begun = transitionOf('begin', from);
  return isAllowedTransition(from, to) || (begun !== undefined && isAllowedTransition(begun, to));
}

/** An SQL list of states, for `state IN (${statesSql(...)})`. */
export function statesSql(states: readonly UpdateState[]): RawBuilder<unknown> {
  return sql.join(states.map((s) => sql.lit(s)));
}

/** `OPEN_STATES` as an SQL list. */
export const OPEN = statesSql(OPEN_STATES);

/** The `from` states of an event as an SQL list. */
export function fromSql(event: AttemptEvent): RawBuilder<unknown> {
  return statesSql(TRANSITIONS[event].from);
}

/**
 * The columns a move into `to` sets besides `state` (database time, compared across nodes):
 * the timestamp of the step, `percent` 100 on finish, `completed_at` on a final state.
 */
export function stepColumns(to: UpdateState): Record<string, RawBuilder<Date> | number> {
  const now = sql<Date>`now()`;
  const set: Record<string, RawBuilder<Date> | number> = { updated_at: now };
  if (to === 'sent') set.sent_at = now;
  if (to === 'begun') set.begun_at = now;
  if (to === 'finished') Object.assign(set, { finished_at: now, percent: 100 });
  if (FINAL_STATES.includes(to)) set.completed_at = now;
  return set;
}

/** The same columns as SQL assignments, for raw statements (`SET state = ..., ${stepSql('failed')}`). */
export function stepSql(to: UpdateState): RawBuilder<unknown> {
  return sql.join(
    Object.entries(stepColumns(to)).map(([column, value]) => sql`${sql.ref(column)} = ${value}`),
    sql`, `,
  );
}
