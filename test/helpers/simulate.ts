/** `fleethub-device simulate` in-process, stopped as soon as its stderr says what a test waits for. */
import { main as deviceMain } from '../../device-client/cli.ts';
import { runCaptured } from './cli-io.ts';

/**
 * Runs `fleethub-device simulate <argv>` until its stderr matches `stop`, or for at most
 * `timeoutMs` (then it is stopped as by Ctrl-C); its exit code, stdout (the summary) and stderr.
 */
export async function simulateUntil(
  stop: RegExp | string,
  argv: string[],
  timeoutMs = 30_000,
): Promise<{ code: number; out: string; err: string }> {
  return runCaptured(deviceMain, ['simulate', ...argv], { stopOn: stop, signal: AbortSignal.timeout(timeoutMs) });
}
