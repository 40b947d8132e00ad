/** A `CliIo` for running the CLIs in-process: what they print is collected, and they can be stopped. */
import type { CliIo } from '../../shared/cli.ts';

export interface CapturedIo {
  /** The io to hand the command. */
  io: CliIo;
  /** Everything the command wrote to stdout so far. */
  readonly out: string;
  /** Everything the command wrote to stderr so far. */
  readonly err: string;
  /** Stops a long-running command (`status --watch`, `simulate`), as Ctrl-C would. */
  abort(): void;
}

export interface CaptureOptions {
  /** Stop the command once its stderr (all of it so far) contains this string or matches this pattern. */
  stopOn?: string | RegExp;
  /** The command's environment (default: empty, so nothing of the test process leaks in). */
  env?: NodeJS.ProcessEnv;
  /** Stop the command when this aborts, too. */
  signal?: AbortSignal;
  /** Whether stdout is a terminal (commands that draw in place, such as `deployments watch`). */
  isTTY?: boolean;
}

/** A fresh `CliIo` that collects out and err; `stopOn`, `abort()` or `signal` stop the command. */
export function captureIo(options: CaptureOptions = {}): CapturedIo {
  const controller = new AbortController();
  const { stopOn, signal } = options;
  if (signal) {
    if (signal.aborted) controller.abort();
    else signal.addEventListener('abort', () => controller.abort(), { once: true });
  }
  let out = '';
  let err = '';
  const io: CliIo = {
    out: (text) => {
      out += text;
    },
    err: (text) => {
      err += text;
      if (stopOn !== undefined && (typeof stopOn === 'string' ? err.includes(stopOn) : stopOn.test(err)))
        controller.abort();
    },
    env: options.env ?? {},
    signal: controller.signal,
    ...(options.isTTY !== undefined ? { isTTY: options.isTTY } : {}),
  };
  return {
    io,
    get out() {
      return out;
    },
    get err() {
      return err;
    },
    abort: () => controller.abort(),
  };
}

/** Runs `command(argv, io)` with a `captureIo(options)` io: its exit code and what it printed. */
export async function runCaptured(
  command: (argv: string[], io: CliIo) => Promise<number>,
  argv: string[],
  options: CaptureOptions = {},
): Promise<{ code: number; out: string; err: string }> {
  const captured = captureIo(options);
  const code = await command(argv, captured.io);
  return { code, out: captured.out, err: captured.err };
}
