import path from 'node:path';
import { initDevPki, loadPki, PkiError, PKI_FILES, writeDeviceCredentials } from '../../certs/pki.ts';
import { loadConfig } from '../config.ts';

const HELP = `Usage: fleethub certs <action> [options]

Development PKI: a root CA, a device-signer CA and a server certificate, plus device certificates.

Actions:
  init                      create what is missing of the PKI (never overwrites a key)
  device <serial> --out D   issue a certificate for device <serial> (CN) and write
                            D/cert.pem, D/key.pem and D/ca.pem (the CA to verify the server)

Options:
  --dir D                   PKI directory (default: certsDir = <data-dir>/pki, FLEETHUB_CERTS_DIR)
  --host H                  init: a DNS name or IP of the server certificate; repeatable
                            (default localhost, 127.0.0.1, ::1)
  --data-dir D, --certs-dir D   as for fleethub serve, to locate the default PKI directory
  -h, --help                this help`;

interface ParsedArgs {
  positional: string[];
  dir?: string;
  out?: string;
  hosts: string[];
  configArgs: string[];
  help: boolean;
}

class UsageError extends Error {}

function parseArgs(argv: string[]): ParsedArgs {
  const parsed: ParsedArgs = { positional: [], hosts: [], configArgs: [], help: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--help' || arg === '-h') {
      parsed.help = true;
      continue;
    }
    if (!arg.startsWith('--')) {
      parsed.positional.push(arg);
      continue;
    }
    const [name, inline] = arg.slice(2).split(/=(.*)/s, 2) as [string, string | undefined];
    const value = inline ?? argv[++i];
    if (value === undefined || (inline === undefined && value.startsWith('--')))
      throw new UsageError(`--${name} needs a value`);
    switch (name) {
      case 'dir':
        parsed.dir = value;
        break;
      case 'out':
        parsed.out = value;
        break;
      case 'host':
        parsed.hosts.push(
          ...value
            .split(',')
            .map((h) => h.trim())
            .filter(Boolean),
        );
        break;
      case 'data-dir':
      case 'certs-dir':
        parsed.configArgs.push(`--${name}`, value);
        break;
      default:
        throw new UsageError(`unknown option --${name}`);
    }
  }
  return parsed;
}

/** `fleethub certs init|device ...`; returns the process exit code. */
export async function runCertsCommand(argv: string[]): Promise<number> {
  let args: ParsedArgs;
  try {
    args = parseArgs(argv);
  } catch (err) {
    console.error(`${(err as Error).message}\n\n${HELP}`);
    return 2;
  }
  const [action, ...rest] = args.positional;
  if (args.help || !action) {
    console.log(HELP);
    return args.help ? 0 : 2;
  }
  const dir = path.resolve(args.dir ?? loadConfig(args.configArgs).certsDir);
  try {
    switch (action) {
      case 'init':
        return await init(dir, args, rest);
      case 'device':
        return device(dir, args, rest);
      default:
        console.error(`unknown certs action ${JSON.stringify(action)}\n\n${HELP}`);
        return 2;
    }
  } catch (err) {
    if (err instanceof PkiError) {
      console.error(`error (${err.code}): ${err.message}`);
      return 1;
    }
    throw err;
  }
}

async function init(dir: string, args: ParsedArgs, rest: string[]): Promise<number> {
  if (rest.length > 0) {
    console.error(`certs init takes no arguments, got ${rest.join(' ')}\n\n${HELP}`);
    return 2;
  }
  const { created } = await initDevPki(dir, { hosts: args.hosts });
  if (created.length === 0) {
    console.log(`PKI in ${dir} is complete; nothing created (existing keys are never overwritten)`);
  } else {
    for (const file of created) console.log(`created  ${file}`);
  }
  console.log(`devices trust:        ${path.join(dir, PKI_FILES.rootCert)}`);
  console.log(`register signer CA:   ${path.join(dir, PKI_FILES.signerCert)}`);
  console.log(`device listener uses: ${path.join(dir, PKI_FILES.serverCert)} / ${PKI_FILES.serverKey}`);
  return 0;
}

function device(dir: string, args: ParsedArgs, rest: string[]): number {
  const [serial, ...extra] = rest;
  if (!serial || extra.length > 0 || !args.out) {
    console.error(`usage: fleethub certs device <serial> --out <dir> [--dir D]\n\n${HELP}`);
    return 2;
  }
  const material = loadPki(dir);
  const out = path.resolve(args.out);
  const files = writeDeviceCredentials(material, serial, out);
  console.log(`device ${serial}:`);
  console.log(`  certificate  ${files.certPath}`);
  console.log(`  key          ${files.keyPath}`);
  console.log(`  server CA    ${files.caPath}`);
  return 0;
}
