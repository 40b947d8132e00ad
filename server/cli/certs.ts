/** `fleethub certs init | device`: the development PKI (declared in server/cli/index.ts). */
import path from 'node:path';
import { initDevPki, loadPki, PkiError, PKI_FILES, writeDeviceCredentials } from '../../certs/pki.ts';
import { loadConfig } from '../config.ts';
import { CliError, type CliIo } from './client.ts';

/** Options of `certs init` and `certs device`. */
export interface CertsFlags {
  dir?: string;
  host?: string[];
  out?: string;
  dataDir?: string;
  certsDir?: string;
}

/** `fleethub certs ...` as the CLI runs it (kept for callers of the old entry point). */
export async function runCertsCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(['certs', ...argv], io);
}

/** Runs `certs init` (no serial) or `certs device <serial>`; a PKI problem is exit 1 with its code. */
export async function runCerts(
  action: 'init' | 'device',
  flags: CertsFlags,
  io: CliIo,
  serial?: string,
): Promise<number> {
  const configArgs: string[] = [];
  if (flags.dataDir) configArgs.push('--data-dir', flags.dataDir);
  if (flags.certsDir) configArgs.push('--certs-dir', flags.certsDir);
  const dir = path.resolve(flags.dir ?? loadConfig(configArgs, io.env).certsDir);
  try {
    return action === 'init' ? await init(dir, flags, io) : device(dir, serial!, flags.out!, io);
  } catch (err) {
    if (err instanceof PkiError) throw new CliError(`(${err.code}) ${err.message}`);
    throw err;
  }
}

async function init(dir: string, flags: CertsFlags, io: CliIo): Promise<number> {
  const hosts = (flags.host ?? []).flatMap((h) =>
    h
      .split(',')
      .map((x) => x.trim())
      .filter(Boolean),
  );
  const { created } = await initDevPki(dir, { hosts });
  if (created.length === 0) {
    io.out(`PKI in ${dir} is complete; nothing created (existing keys are never overwritten)\n`);
  } else {
    for (const file of created) io.out(`created  ${file}\n`);
  }
  io.out(`devices trust:        ${path.join(dir, PKI_FILES.rootCert)}\n`);
  io.out(`register signer CA:   ${path.join(dir, PKI_FILES.signerCert)}\n`);
  io.out(`device listener uses: ${path.join(dir, PKI_FILES.serverCert)} / ${PKI_FILES.serverKey}\n`);
  return 0;
}

function device(dir: string, serial: string, outDir: string, io: CliIo): number {
  const material = loadPki(dir);
  const out = path.resolve(outDir);
  const files = writeDeviceCredentials(material, serial, out);
  io.out(`device ${serial}:\n`);
  io.out(`  certificate  ${files.certPath}\n`);
  io.out(`  key          ${files.keyPath}\n`);
  io.out(`  server CA    ${files.caPath}\n`);
  return 0;
}
