/**
 * `fleethub firmware ...`: upload images (streamed, with a progress bar), manage a product's
 * signing keys, sign images and create signing keys.
 */
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { generateSigningKeyPair, parseSigningPublicKey, signFirmwareDigest } from '../firmware/signing.ts';
import {
  ApiClient,
  CliError,
  orgOf,
  parseCommand,
  printJson,
  printRecord,
  printRows,
  processIo,
  resolveClientOptions,
  runCommand,
  type CliIo,
  type ClientOptions,
} from './client.ts';

const USAGE = `Usage:
  fleethub firmware upload <file> --product P --version V [--org O] [--platform P] [--architecture A]
                           [--component C] [--format F] [--uuid UUID] [--sign-key key.pem | --signature SIG]
  fleethub firmware keys add --product P --name N --public-key pub.pem [--org O]
  fleethub firmware keys list --product P [--org O]
  fleethub firmware keys remove --product P <name|id> [--org O]
  fleethub firmware sign <file> --key key.pem        prints the detached signature (base64)
  fleethub firmware keygen --out DIR [--name N]      writes N.key (private, 0600) and N.pub

Common options: --url, --token, --json. Signatures are ed25519 over the image's SHA-256 digest.`;

/** Entry point of `fleethub firmware`; returns the exit code. */
export async function runFirmwareCommand(argv: string[], io: CliIo = processIo): Promise<number> {
  return runCommand(io, async () => {
    const [sub, ...rest] = argv;
    switch (sub) {
      case 'upload':
        return upload(rest, io);
      case 'keys':
        return keys(rest, io);
      case 'sign':
        return sign(rest, io);
      case 'keygen':
        return keygen(rest, io);
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        io.out(`${USAGE}\n`);
        return sub === undefined ? 2 : 0;
      default:
        throw new CliError(`unknown firmware command ${JSON.stringify(sub)}\n\n${USAGE}`, 2);
    }
  });
}

async function upload(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(
    argv,
    {
      product: { type: 'string' },
      version: { type: 'string' },
      org: { type: 'string' },
      platform: { type: 'string' },
      architecture: { type: 'string' },
      component: { type: 'string' },
      format: { type: 'string' },
      uuid: { type: 'string' },
      'sign-key': { type: 'string' },
      signature: { type: 'string' },
    },
    USAGE,
  );
  const file = positionals[0];
  if (!file || !values.product || !values.version)
    throw new CliError(`upload needs <file>, --product and --version\n\n${USAGE}`, 2);
  if (!existsSync(file)) throw new CliError(`${file} does not exist`);
  let signature = values.signature;
  if (values['sign-key']) {
    if (signature) throw new CliError('pass either --sign-key or --signature, not both', 2);
    signature = signFirmwareDigest(await sha256OfFile(file), readFileSync(values['sign-key'], 'utf8'));
  }
  const size = statSync(file).size;
  const clientOptions = resolveClientOptions(values, io.env);
  // A product named (not by id) needs its org: --org, FLEETHUB_ORG, the login's, or the only one visible.
  const org = await orgOf(new ApiClient(clientOptions), values, io);
  const bar = progressBar(io);
  const firmware = await uploadFirmwareStream({
    client: clientOptions,
    query: {
      product: values.product,
      version: values.version,
      org,
      platform: values.platform,
      architecture: values.architecture,
      component: values.component,
      format: values.format,
      uuid: values.uuid,
      signature,
    },
    source: createReadStream(file, { highWaterMark: 256 * 1024 }),
    size,
    onProgress: (sent) => bar.update(sent, size),
  });
  bar.done();
  printRecord(io, values.json, firmware);
  return 0;
}

export interface UploadStreamOptions {
  client: ClientOptions;
  query: Record<string, string | undefined>;
  source: Readable;
  /** Content-Length to announce (unknown: chunked). */
  size?: number;
  onProgress?: (sentBytes: number) => void;
}

/**
 * POSTs an image to `/api/v1/firmware` as a stream. node:http, not fetch: undici reads a Node
 * stream body ahead without backpressure and would hold much of the image in memory.
 */
export async function uploadFirmwareStream(options: UploadStreamOptions): Promise<Record<string, unknown>> {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(options.query)) if (v !== undefined && v !== '') params.set(k, v);
  const url = new URL(`${options.client.url}/api/v1/firmware?${params}`);
  const headers: Record<string, string | number> = {
    'content-type': 'application/octet-stream',
    accept: 'application/json',
  };
  if (options.client.token) headers.authorization = `Bearer ${options.client.token}`;
  if (options.size !== undefined) headers['content-length'] = options.size;
  const request = (url.protocol === 'https:' ? https : http).request(url, { method: 'POST', headers });
  const response = new Promise<http.IncomingMessage>((resolve, reject) => {
    request.once('response', resolve);
    request.once('error', reject);
  });
  let sent = 0;
  const counter = new Transform({
    transform(chunk: Buffer, _enc, callback) {
      sent += chunk.length;
      options.onProgress?.(sent);
      callback(null, chunk);
    },
  });
  // The server may answer (e.g. 401, 409) before the body is sent: the response wins.
  const sending = pipeline(options.source, counter, request).catch(() => undefined);
  let res: http.IncomingMessage;
  try {
    res = await response;
  } catch (err) {
    throw new CliError(
      `cannot reach ${options.client.url} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); check --url or FLEETHUB_URL`,
    );
  }
  const chunks: Buffer[] = [];
  for await (const chunk of res) chunks.push(chunk as Buffer);
  options.source.destroy();
  await sending;
  const text = Buffer.concat(chunks).toString('utf8');
  const body = text ? (JSON.parse(text) as Record<string, unknown>) : {};
  const status = res.statusCode ?? 0;
  if (status >= 400) {
    const error = (body as { error?: { code?: string; message?: string; details?: unknown } }).error;
    const message =
      status === 401 && !options.client.token
        ? 'not logged in: run `fleethub login` or pass --token / set FLEETHUB_TOKEN'
        : (error?.message ?? `HTTP ${status}`);
    throw new CliError(message, 1, status, error?.code, error?.details);
  }
  return body;
}

async function keys(argv: string[], io: CliIo): Promise<number> {
  const [action, ...rest] = argv;
  const { values, positionals } = parseCommand(
    rest,
    {
      product: { type: 'string' },
      org: { type: 'string' },
      name: { type: 'string' },
      'public-key': { type: 'string' },
    },
    USAGE,
  );
  if (!values.product) throw new CliError(`--product is required\n\n${USAGE}`, 2);
  const client = new ApiClient(resolveClientOptions(values, io.env));
  const base = `/api/v1/products/${encodeURIComponent(values.product)}/signing-keys`;
  const query = `?org=${encodeURIComponent(await orgOf(client, values, io))}`;
  switch (action) {
    case 'add': {
      if (!values.name || !values['public-key'])
        throw new CliError(`keys add needs --name and --public-key\n\n${USAGE}`, 2);
      const pem = readFileSync(values['public-key'], 'utf8');
      parseSigningPublicKey(pem); // a clear local error beats a round trip
      printRecord(
        io,
        values.json,
        await client.post<Record<string, unknown>>(base + query, { name: values.name, public_key_pem: pem }),
      );
      return 0;
    }
    case 'list': {
      const { items: rows } = await client.get<{ items: Array<Record<string, unknown>> }>(`${base + query}&limit=1000`);
      printRows(io, values.json, rows, [
        { header: 'name', value: (r) => r.name },
        { header: 'fingerprint', value: (r) => r.fingerprint },
        { header: 'id', value: (r) => r.id },
        { header: 'created_at', value: (r) => r.created_at },
      ]);
      return 0;
    }
    case 'remove': {
      const ref = positionals[0];
      if (!ref) throw new CliError(`keys remove needs the key's name or id\n\n${USAGE}`, 2);
      const removed = await client.delete<Record<string, unknown>>(`${base}/${encodeURIComponent(ref)}${query}`);
      if (values.json) printJson(io, removed);
      else io.out(`removed signing key ${String(removed.name)} (${String(removed.fingerprint)})\n`);
      return 0;
    }
    default:
      throw new CliError(`unknown keys command ${JSON.stringify(action)}; use add, list or remove\n\n${USAGE}`, 2);
  }
}

async function sign(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(argv, { key: { type: 'string' } }, USAGE);
  const file = positionals[0];
  if (!file || !values.key) throw new CliError(`sign needs <file> and --key\n\n${USAGE}`, 2);
  const sha256 = await sha256OfFile(file);
  const signature = signFirmwareDigest(sha256, readFileSync(values.key, 'utf8'));
  if (values.json) printJson(io, { sha256, signature });
  else io.out(`${signature}\n`);
  return 0;
}

async function keygen(argv: string[], io: CliIo): Promise<number> {
  const { values } = parseCommand(argv, { out: { type: 'string' }, name: { type: 'string' } }, USAGE);
  if (!values.out) throw new CliError(`keygen needs --out DIR\n\n${USAGE}`, 2);
  const name = values.name ?? 'firmware-signing';
  mkdirSync(values.out, { recursive: true });
  const keyPath = path.join(values.out, `${name}.key`);
  const pubPath = path.join(values.out, `${name}.pub`);
  if (existsSync(keyPath)) throw new CliError(`${keyPath} already exists; choose another --name or --out`);
  const pair = generateSigningKeyPair();
  writeFileSync(keyPath, pair.privateKeyPem, { mode: 0o600, flag: 'wx' });
  writeFileSync(pubPath, pair.publicKeyPem);
  const { fingerprint } = parseSigningPublicKey(pair.publicKeyPem);
  if (values.json) printJson(io, { private_key: keyPath, public_key: pubPath, fingerprint });
  else
    io.out(
      `private key ${keyPath} (keep it secret)\npublic key  ${pubPath}\nfingerprint ${fingerprint}\nregister it: fleethub firmware keys add --product P --name ${name} --public-key ${pubPath}\n`,
    );
  return 0;
}

async function sha256OfFile(file: string): Promise<string> {
  const hash = createHash('sha256');
  await pipeline(createReadStream(file), hash);
  return hash.digest('hex');
}

/** A progress bar on stderr when it is a terminal. */
function progressBar(io: CliIo) {
  const tty = io === processIo && process.stderr.isTTY;
  let last = 0;
  let shown = false;
  return {
    update(sent: number, total: number) {
      if (!tty || (Date.now() - last < 100 && sent < total)) return;
      last = Date.now();
      shown = true;
      const pct = total ? sent / total : 1;
      const filled = Math.round(pct * 30);
      io.err(
        `\r[${'#'.repeat(filled)}${'.'.repeat(30 - filled)}] ${(pct * 100).toFixed(1).padStart(5)}%  ${(sent / 1048576).toFixed(1)}/${(total / 1048576).toFixed(1)} MiB\u001b[K`,
      );
    },
    done() {
      if (shown) io.err('\n');
    },
  };
}
