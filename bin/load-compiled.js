// Imports a module of the compiled build, or says how to make the build when there is none.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const DIST = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../dist');

export async function loadCompiled(file) {
  const target = path.join(DIST, file);
  if (!existsSync(target)) {
    console.error(`fleethub is not built: ${target} is missing. Run "npm run build" (npm install runs it too).`);
    process.exit(1);
  }
  return import(pathToFileURL(target).href);
}
