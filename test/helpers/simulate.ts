/** `fleethub-device simulate` in-process, stopped as soon as its stderr says what a test waits for. */
import { main as deviceMain } from '../../device-client/cli.ts';
import type { CliIo } from '../../server/cli/client.ts';

/**
 * Runs `fleethub-device simulate <argv>` until its stderr matches `stop`, or for at most
 * `timeoutMs` (then it is stopped as by Ctrl-C); its exit code, stdout (the summary) and stderr.
 */
export async function simulateUntil(
  stop: RegExp | string,
  argv: string[],
  timeoutMs = 30_000,
): Promise<{ code: number; out: string; err: string }> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  let out = '';
  let err = '';
  const io: CliIo = {
    out: (t) => {
      out += t;
    },
    err: (t) => {
      err += t;
      if (typeof stop === 'string' ? err.includes(stop) : stop.test(err)) controller.abort();
    },
    env: {},
    signal: controller.signal,
  };
  const code = await deviceMain(['simulate', ...argv], io).finally(() => clearTimeout(timer));
  return { code, out, err };
}
