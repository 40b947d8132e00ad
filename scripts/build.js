#!/usr/bin/env node
// Compiles the server, the device client and the migrations to dist/ (tsc rewrites the `.ts`
// import specifiers to `.js`), then copies what tsc does not emit: the dashboard's static files.
// Run by `npm run build` and by `prepare`, so `npm install && npm start` works on a bare clone.
// `node scripts/build.js <dir>` builds into <dir> instead of dist/ (the compiled-build test does,
// so it never removes the dist/ that other tests run meanwhile).
import { execFileSync } from 'node:child_process';
import { cpSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dist = process.argv[2] ? path.resolve(process.argv[2]) : path.join(root, 'dist');
rmSync(dist, { recursive: true, force: true });
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
execFileSync(process.execPath, [tsc, '-p', path.join(root, 'tsconfig.build.json'), '--outDir', dist], {
  stdio: 'inherit',
});
cpSync(path.join(root, 'server/web/static'), path.join(dist, 'server/web/static'), { recursive: true });
