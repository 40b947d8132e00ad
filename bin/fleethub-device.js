#!/usr/bin/env node
// Runs the compiled device client (dist/); it starts itself when run as this bin.
import { loadCompiled } from './load-compiled.js';

await loadCompiled('device-client/cli.js');
