/** The options every operator command shares (the commander plumbing is shared/cli.ts). */
import type { Command } from 'commander';

export { act, type CliContext, finishTree, packageVersion, runProgram, walk } from '../../shared/cli.ts';

/** Adds `--url`, `--token`, `--profile` and `--json`: every command that talks to a server has them. */
export function withServer(cmd: Command): Command {
  return cmd
    .option('--url <url>', "server URL (FLEETHUB_URL; default: the profile's, else http://127.0.0.1:4000)")
    .option('--token <token>', "API token or login token (FLEETHUB_TOKEN; default: the profile's saved login)")
    .option('--profile <name>', 'saved login to use (FLEETHUB_PROFILE; default: default)')
    .option('--json', 'print JSON instead of a table');
}

/** `withServer` plus `--org`. */
export function withOrg(cmd: Command): Command {
  return withServer(cmd).option('--org <org>', 'organization name or id (FLEETHUB_ORG; default: your only one)');
}

/** `--limit` / `--offset` of a list: without `--limit` a list shows every item (read page by page). */
export type PageFlags = { limit?: string; offset?: string };

export function paged(cmd: Command): Command {
  return cmd
    .option('--limit <n>', 'show at most N items (default: all of them)')
    .option('--offset <n>', 'items to skip first');
}
