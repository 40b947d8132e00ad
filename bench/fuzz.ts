/**
 * `npm run bench -- --fuzz [--fuzz-runs=N] [--fuzz-seed=S]`: the protocol fuzz test
 * (test/fuzz/protocols.test.ts) at length. 2,000 inputs per protocol by default, a fresh seed
 * each run unless given (printed, so a finding can be replayed with FUZZ_SEED), and every kind
 * of failing input listed (FUZZ_REPORT) instead of stopping at the first. Exits non-zero on any.
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export function runFuzz(argv: string[]): number {
  const value = (name: string) => argv.find((a) => a.startsWith(`--${name}=`))?.split('=')[1];
  const runs = value('fuzz-runs') ?? '2000';
  const seed = value('fuzz-seed') ?? String(Math.floor(Math.random() * 2 ** 31));
  console.error(
    `[bench fuzz] ${runs} inputs per protocol, seed ${seed}${process.env.DATABASE_URL ? ', PostgreSQL' : ', PGlite'}`,
  );
  const result = spawnSync(
    process.execPath,
    ['--import', 'tsx', '--test', '--test-timeout=0', path.join(ROOT, 'test/fuzz/protocols.test.ts')],
    {
      cwd: ROOT,
      stdio: 'inherit',
      env: { ...process.env, FUZZ_RUNS: runs, FUZZ_SEED: seed, FUZZ_REPORT: '1' },
    },
  );
  return result.status ?? 1;
}
