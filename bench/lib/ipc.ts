/**
 * Request/response over a child process's IPC channel: the coordinator calls, the child
 * answers. Every message is `{ id, type, ... }`; answers carry the same id.
 */
import type { ChildProcess } from 'node:child_process';

export interface Request {
  id: number;
  type: string;
  [key: string]: unknown;
}

export type Answer = { id: number; ok: true; value: unknown } | { id: number; ok: false; error: string };

/** The coordinator side: `call(child, 'type', args)` resolves with the child's answer. */
export class Rpc {
  #next = 1;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();

  constructor(
    readonly child: ChildProcess,
    readonly name: string,
  ) {
    child.on('message', (message: unknown) => {
      const answer = message as Answer;
      if (typeof answer?.id !== 'number') return;
      const pending = this.#pending.get(answer.id);
      if (!pending) return;
      this.#pending.delete(answer.id);
      if (answer.ok) pending.resolve(answer.value);
      else pending.reject(new Error(`${this.name}: ${answer.error}`));
    });
    child.once('exit', (code, signal) => {
      for (const p of this.#pending.values())
        p.reject(new Error(`${this.name} exited (${code ?? signal}) with a call pending`));
      this.#pending.clear();
    });
  }

  call<T = unknown>(type: string, args: Record<string, unknown> = {}): Promise<T> {
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.send({ id, type, ...args });
    });
  }
}

/** The child side: answers each request with the handler's result (or its error message). */
export function serveRpc(handlers: Record<string, (request: Request) => unknown>): void {
  process.on('message', (message: unknown) => {
    const request = message as Request;
    if (typeof request?.id !== 'number') return;
    const handler = handlers[request.type];
    Promise.resolve()
      .then(() => {
        if (!handler) throw new Error(`unknown request ${request.type}`);
        return handler(request);
      })
      .then(
        (value) => process.send?.({ id: request.id, ok: true, value: value ?? null }),
        (err: unknown) =>
          process.send?.({
            id: request.id,
            ok: false,
            error: err instanceof Error ? `${err.message}\n${err.stack}` : String(err),
          }),
      );
  });
  process.on('disconnect', () => process.exit(0));
}

/** Monotonic clock in milliseconds, shared by every process on the machine (CLOCK_MONOTONIC). */
export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}
