/**
 * What both CLIs (`fleethub`, `fleethub-device`) share: where output goes, errors that carry an
 * exit code, and how commands are declared on commander — one tree per program is the single
 * source of arguments, options and help texts (docs/cli.md).
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { type Command, CommanderError, type OptionValues } from 'commander';

/** Where a command writes; tests pass buffers, the real CLI passes process streams. */
export interface CliIo {
  out(text: string): void;
  err(text: string): void;
  env: NodeJS.ProcessEnv;
  /** Whether `out` is a terminal (`status --watch` redraws in place only then). */
  isTTY?: boolean;
  /** Stops long-running commands (`status --watch`); the real CLI stops on Ctrl-C instead. */
  signal?: AbortSignal;
}

export const processIo: CliIo = {
  out: (text) => void process.stdout.write(text),
  err: (text) => void process.stderr.write(text),
  env: process.env,
  get isTTY() {
    return process.stdout.isTTY === true;
  },
};

/** An error a command reports to the user: message on stderr, non-zero exit. */
export class CliError extends Error {
  override readonly name = 'CliError';
  constructor(
    message: string,
    readonly exitCode = 1,
    /** HTTP status and API code when the server refused. */
    readonly status?: number,
    readonly code?: string,
    readonly details?: unknown,
  ) {
    super(message);
  }
}

/**
 * Runs a command body and turns failures into an exit code: CliError → its message on stderr
 * (`error: ...`), anything else → the error text. Returns 0 on success.
 */
export async function runCommand(io: CliIo, body: () => Promise<number | undefined>): Promise<number> {
  try {
    return (await body()) ?? 0;
  } catch (err) {
    if (err instanceof CliError) {
      io.err(`error: ${err.message}\n`);
      return err.exitCode;
    }
    io.err(`error: ${(err as Error).message ?? String(err)}\n`);
    return 1;
  }
}

/** What every action of one run shares: where output goes, and the exit code it settled on. */
export interface CliContext {
  io: CliIo;
  exitCode: number;
}

/**
 * A command's body: its parsed options and positional arguments (variadic ones as arrays). It
 * resolves to the exit code, or to anything else (nothing) for 0.
 */
export type Action<O extends OptionValues> = (
  options: O,
  args: (string | string[] | undefined)[],
  cmd: Command,
) => Promise<unknown>;

/** Runs `body` as the command's action; its result (or error) sets the exit code. */
export function act<O extends OptionValues = OptionValues>(cmd: Command, ctx: CliContext, body: Action<O>): Command {
  return cmd.action(async function (this: Command) {
    ctx.exitCode = await runCommand(ctx.io, async () => {
      const code = await body(this.opts<O>(), this.processedArgs, this);
      return typeof code === 'number' ? code : 0;
    });
  });
}

/** Applies the run's output, error handling and suggestions to `cmd` and every command below it. */
export function finishTree(cmd: Command, io: CliIo): Command {
  cmd
    .exitOverride()
    .showSuggestionAfterError(true)
    .showHelpAfterError('(add --help for usage)')
    .configureOutput({ writeOut: (s) => io.out(s), writeErr: (s) => io.err(s), outputError: (s, write) => write(s) })
    .configureHelp({ sortSubcommands: false, showGlobalOptions: false });
  for (const sub of cmd.commands) finishTree(sub, io);
  return cmd;
}

/**
 * Parses and runs `argv` (without the program name): the action's exit code, 0 after `--help` or
 * `--version`, 2 for a usage error (unknown command or flag, missing argument).
 */
export async function runProgram(program: Command, ctx: CliContext, argv: string[]): Promise<number> {
  try {
    await program.parseAsync(argv, { from: 'user' });
    return ctx.exitCode;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    throw err;
  }
}

/** Every command of a tree with its path from the root (`['groups', 'add']`), for tests and docs. */
export function walk(cmd: Command, prefix: string[] = []): Array<{ path: string[]; command: Command }> {
  const out = [{ path: prefix, command: cmd }];
  for (const sub of cmd.commands) out.push(...walk(sub, [...prefix, sub.name()]));
  return out;
}

/** This package's version: the nearest package.json named fleethub above `dir` (sources or a build). */
export function packageVersion(dir: string): string {
  for (let d = dir; ; d = path.dirname(d)) {
    try {
      const pkg = JSON.parse(readFileSync(path.join(d, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'fleethub' && pkg.version) return pkg.version;
    } catch {
      // not here: look one directory up
    }
    if (path.dirname(d) === d) return 'unknown';
  }
}
