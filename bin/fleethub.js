#!/usr/bin/env node
// Runs the TypeScript sources through tsx so the bin needs no build step.
import { register } from 'tsx/esm/api';
register();
const { main } = await import('../server/cli/index.ts');
try {
  process.exitCode = await main(process.argv.slice(2));
} catch (err) {
  console.error(err instanceof Error ? err.message : String(err));
  process.exitCode = 1;
}
