/**
 * Progress reports persisted in batches: one set-based UPDATE for every report that arrived
 * while the previous batch was being written. On embedded PGlite (one connection) a transaction
 * per report capped ingest far below what a fleet sends; a batch costs about one statement.
 *
 * When no batch is in flight, a report starts one as soon as the event loop has handled the I/O
 * at hand (`setImmediate`: no timer, so a lone report is not delayed): every report read in the
 * same turn of the loop — one socket's frame per callback — shares it, and reports arriving while
 * it is written gather for the next. On PGlite this is what batches at all: the statement runs in
 * WebAssembly on this thread and has committed before the next socket is read, so a batch started
 * within the tick (a microtask) held one report, one statement per report. Each caller's promise settles only
 * after the statement that persisted its report has committed and the operators' events were
 * published, with the attempt as persisted. Reports the batch statement did not apply (no open
 * attempt for that version, or an attempt not in begun/downloading) go through `applyOne`, the
 * single-report path, which applies them or throws the same typed error as before.
 */
import { sql } from 'kysely';
import type { Db } from '../db/index.ts';
import type { UpdateAttempt } from '../db/schema.ts';
import { fromSql, OPEN } from './link-table.ts';

/** A validated `firmware_update_progress` report of one device. */
export interface ProgressReport {
  deviceId: string;
  component: string;
  version: string;
  percent: number;
  bytes: number;
  total: number;
}

export interface ProgressBatcherOptions<R extends ProgressReport> {
  db: Db;
  /** The single-report path, for reports the batch statement did not apply. */
  applyOne(report: R): Promise<UpdateAttempt>;
  /** Called with the attempts a batch changed, after its commit (publishes to operators). */
  committed(attempts: UpdateAttempt[]): Promise<void>;
  /** Most reports in one statement. */
  maxBatch?: number;
}

/** Counters for tests and metrics. */
export interface ProgressBatchStats {
  /** Reports submitted. */
  reports: number;
  /** Batch statements run. */
  batches: number;
  /** Attempts the batch statements changed. */
  applied: number;
  /** Reports handed to the single-report path. */
  fallbacks: number;
  /** Batch statements that failed. */
  failed: number;
}

interface Pending<R> {
  report: R;
  resolve(attempt: UpdateAttempt): void;
  reject(err: unknown): void;
}

/** PostgreSQL aborted the batch to break a lock cycle (only possible with several connections). */
const DEADLOCK_DETECTED = '40P01';

export class ProgressBatcher<R extends ProgressReport> {
  readonly stats: ProgressBatchStats = { reports: 0, batches: 0, applied: 0, fallbacks: 0, failed: 0 };
  readonly #options: ProgressBatcherOptions<R>;
  readonly #maxBatch: number;
  #queue: Pending<R>[] = [];
  #running = false;
  /** Events are published in batch order, so an operator never sees an older percent last. */
  #published: Promise<void> = Promise.resolve();

  constructor(options: ProgressBatcherOptions<R>) {
    this.#options = options;
    this.#maxBatch = options.maxBatch ?? 500;
  }

  /** Persists `report`; resolves with its attempt as committed, or rejects like the single-report path. */
  submit(report: R): Promise<UpdateAttempt> {
    this.stats.reports++;
    return new Promise<UpdateAttempt>((resolve, reject) => {
      this.#queue.push({ report, resolve, reject });
      if (!this.#running) {
        this.#running = true;
        setImmediate(() => void this.#drain());
      }
    });
  }

  async #drain(): Promise<void> {
    try {
      while (this.#queue.length > 0) {
        const batch = this.#queue.splice(0, this.#maxBatch);
        await this.#write(batch);
      }
    } finally {
      this.#running = false;
    }
  }

  /** Runs one batch statement; publishing and answering run on while the next batch is written. */
  async #write(batch: Pending<R>[]): Promise<void> {
    // Several reports for the same attempt: the latest is written, every caller gets the result.
    const byKey = new Map<string, Pending<R>[]>();
    for (const p of batch) {
      const key = keyOf(p.report.deviceId, p.report.component, p.report.version);
      const same = byKey.get(key);
      if (same) same.push(p);
      else byKey.set(key, [p]);
    }
    const latest = [...byKey.values()].map((same) => same[same.length - 1]!.report);

    let rows: UpdateAttempt[];
    try {
      this.stats.batches++;
      rows = await updateProgress(this.#options.db, latest);
    } catch (err) {
      this.stats.failed++;
      if ((err as { code?: unknown }).code === DEADLOCK_DETECTED) {
        // Nothing was written; one row lock per transaction cannot take part in a cycle.
        for (const same of byKey.values()) void this.#applyEach(same);
        return;
      }
      for (const p of batch) p.reject(err);
      return;
    }
    this.stats.applied += rows.length;

    const applied = new Map(rows.map((a) => [keyOf(a.device_id, a.component, a.to_version), a]));
    const published = this.#published.then(() => this.#options.committed(rows));
    this.#published = published.catch(() => {});
    for (const [key, same] of byKey) {
      const attempt = applied.get(key);
      if (attempt)
        void published.then(
          () => {
            for (const p of same) p.resolve(attempt);
          },
          (err: unknown) => {
            for (const p of same) p.reject(err);
          },
        );
      else void this.#applyEach(same);
    }
  }

  /** The single-report path for reports of one attempt, in the order they were submitted. */
  async #applyEach(same: Pending<R>[]): Promise<void> {
    for (const p of same) {
      this.stats.fallbacks++;
      await this.#options.applyOne(p.report).then(p.resolve, p.reject);
    }
  }
}

function keyOf(deviceId: string, component: string, version: string): string {
  return `${deviceId}\u0000${component}\u0000${version}`;
}

/**
 * One statement for the whole batch: each report moves the latest open attempt of its device,
 * component and version to `downloading`, only from `begun` or `downloading` (the progress
 * transition); other reports change nothing and come back missing. Database time, like the
 * single-report path. Autocommit: the statement has committed when it returns.
 */
async function updateProgress(db: Db, reports: ProgressReport[]): Promise<UpdateAttempt[]> {
  const column = <K extends keyof ProgressReport>(key: K) => reports.map((r) => r[key]);
  const result = await sql<UpdateAttempt>`
    UPDATE update_attempts ua
    SET state = 'downloading', percent = v.percent, bytes = v.bytes, total = v.total, updated_at = now()
    FROM unnest(${column('deviceId')}::uuid[], ${column('component')}::text[], ${column('version')}::text[],
                ${column('percent')}::int[], ${column('bytes')}::bigint[], ${column('total')}::bigint[])
      AS v(device_id, component, version, percent, bytes, total)
    WHERE ua.id = (
        SELECT x.id FROM update_attempts x
        WHERE x.device_id = v.device_id AND x.component = v.component AND x.to_version = v.version AND x.state IN (${OPEN})
        ORDER BY x.created_at DESC LIMIT 1)
      AND ua.state IN (${fromSql('progress')})
    RETURNING ua.*`.execute(db);
  return result.rows;
}
