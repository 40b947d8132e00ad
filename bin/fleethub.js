#!/usr/bin/env node
// Runs the compiled server (dist/, built by `npm run build` or on `npm install` through `prepare`):
// no TypeScript compiler is loaded in production. `npm run dev` runs the sources instead.
import { loadCompiled } from './load-compiled.js';

const { main } = await loadCompiled('server/cli/index.js');
try {
  process.exitCode = await main(process.argv.slice(2));
} catch (err) {
  console.error(err instanceof Error ? err.message : String(err));
  process.exitCode = 1;
}
