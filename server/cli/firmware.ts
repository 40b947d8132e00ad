/**
 * `fleethub firmware upload | keys | sign | keygen`: upload images (streamed, with a progress bar),
 * manage a product's signing keys, sign images and create signing keys.
 */
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { generateSigningKeyPair, parseSigningPublicKey, signFirmwareDigest } from '../firmware/signing.ts';
import type { Command } from 'commander';
import {
  ApiClient,
  CliError,
  orgOf,
  printJson,
  printRecord,
  printRows,
  resolveClientOptions,
  unauthorizedMessage,
  usageError,
  type CliIo,
  type ClientOptions,
  type CommonFlags,
} from './client.ts';
import { act, type CliContext, withOrg } from './command.ts';

type UploadFlags = CommonFlags & {
  product: string;
  version: string;
  platform?: string;
  architecture?: string;
  component?: string;
  format?: string;
  uuid?: string;
  signKey?: string;
  signature?: string;
};

/** Adds upload, keys, sign and keygen to `fleethub firmware`. Signatures: ed25519 over the image's SHA-256. */
export function registerFirmwareStoreCommands(firmware: Command, ctx: CliContext): void {
  const { io } = ctx;
  act<UploadFlags>(
    withOrg(
      firmware
        .command('upload')
        .description('upload an image (streamed, with a progress bar on a terminal)')
        .argument('<file>', 'the image')
        .requiredOption('--product <product>', 'product name or id')
        .requiredOption('--version <version>', 'the version devices report once they run it')
        .option('--platform <platform>', 'hardware platform')
        .option('--architecture <arch>', 'CPU architecture')
        .option('--component <component>', 'component (default firmware)')
        .option(
          '--format <format>',
          'package format (raw, grisp, main-server-zip; default raw): another format of an existing version adds a variant of that release',
        )
        .option('--uuid <uuid>', 'firmware uuid (default: generated)')
        .option('--sign-key <key.pem>', 'sign the image with this ed25519 private key')
        .option('--signature <base64>', 'a detached signature made earlier (fleethub firmware sign)'),
    ),
    ctx,
    async (o, [file]) => upload(file as string, o, io),
  );
  const keys = firmware.command('keys').description("a product's firmware signing keys");
  act<CommonFlags & { product: string; name: string; publicKey: string }>(
    withOrg(
      keys
        .command('add')
        .description('register a public key')
        .requiredOption('--product <product>', 'product name or id')
        .requiredOption('--name <name>', 'a name for the key')
        .requiredOption('--public-key <pub.pem>', 'the ed25519 public key (PEM)'),
    ),
    ctx,
    async (o) => {
      const { client, base, query } = await keysApi(o, io);
      const pem = readFileSync(o.publicKey, 'utf8');
      parseSigningPublicKey(pem); // a clear local error beats a round trip
      printRecord(
        io,
        o.json,
        await client.post<Record<string, unknown>>(base + query, { name: o.name, public_key_pem: pem }),
      );
    },
  );
  act<CommonFlags & { product: string }>(
    withOrg(
      keys
        .command('list', { isDefault: true })
        .description("the product's keys")
        .requiredOption('--product <product>', 'product name or id'),
    ),
    ctx,
    async (o) => {
      const { client, base, query } = await keysApi(o, io);
      const { items: rows } = await client.get<{ items: Array<Record<string, unknown>> }>(`${base + query}&limit=1000`);
      printRows(io, o.json, rows, [
        { header: 'name', value: (r) => r.name },
        { header: 'fingerprint', value: (r) => r.fingerprint },
        { header: 'id', value: (r) => r.id },
        { header: 'created_at', value: (r) => r.created_at },
      ]);
    },
  );
  act<CommonFlags & { product: string }>(
    withOrg(
      keys
        .command('remove')
        .description('remove a key')
        .argument('<key>', 'name or id')
        .requiredOption('--product <product>', 'product name or id'),
    ),
    ctx,
    async (o, [ref]) => {
      const { client, base, query } = await keysApi(o, io);
      const removed = await client.delete<Record<string, unknown>>(
        `${base}/${encodeURIComponent(ref as string)}${query}`,
      );
      if (o.json) printJson(io, removed);
      else io.out(`removed signing key ${String(removed.name)} (${String(removed.fingerprint)})\n`);
    },
  );
  act<{ key: string; json?: boolean }>(
    firmware
      .command('sign')
      .description('print the detached signature (base64) of an image')
      .argument('<file>', 'the image')
      .requiredOption('--key <key.pem>', 'ed25519 private key')
      .option('--json', 'print {sha256, signature}'),
    ctx,
    async (o, [file]) => {
      const sha256 = await sha256OfFile(file as string);
      const signature = signFirmwareDigest(sha256, readFileSync(o.key, 'utf8'));
      if (o.json) printJson(io, { sha256, signature });
      else io.out(`${signature}\n`);
    },
  );
  act<{ out: string; name: string; json?: boolean }>(
    firmware
      .command('keygen')
      .description('create a signing key pair: NAME.key (private, 0600) and NAME.pub')
      .requiredOption('--out <dir>', 'where to write them')
      .option('--name <name>', 'file name', 'firmware-signing')
      .option('--json', 'print the paths and fingerprint as JSON'),
    ctx,
    async (o) => keygen(o, io),
  );
}

async function upload(file: string, o: UploadFlags, io: CliIo): Promise<number> {
  if (!existsSync(file)) throw new CliError(`${file} does not exist`);
  let signature = o.signature;
  if (o.signKey) {
    if (signature) throw usageError('pass either --sign-key or --signature, not both');
    signature = signFirmwareDigest(await sha256OfFile(file), readFileSync(o.signKey, 'utf8'));
  }
  const size = statSync(file).size;
  const clientOptions = resolveClientOptions(o, io.env);
  // A product named (not by id) needs its org: --org, FLEETHUB_ORG, the login's, or the only one visible.
  const org = await orgOf(new ApiClient(clientOptions), o, io);
  const bar = progressBar(io);
  const firmware = await uploadFirmwareStream({
    client: clientOptions,
    query: {
      product: o.product,
      version: o.version,
      org,
      platform: o.platform,
      architecture: o.architecture,
      component: o.component,
      format: o.format,
      uuid: o.uuid,
      signature,
    },
    source: createReadStream(file, { highWaterMark: 256 * 1024 }),
    size,
    onProgress: (sent) => bar.update(sent, size),
  });
  bar.done();
  printRecord(io, o.json, firmware);
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
      status === 401
        ? unauthorizedMessage(options.client, error?.message, error?.details)
        : (error?.message ?? `HTTP ${status}`);
    throw new CliError(message, 1, status, error?.code, error?.details);
  }
  return body;
}

async function keysApi(o: CommonFlags & { product: string }, io: CliIo) {
  const client = new ApiClient(resolveClientOptions(o, io.env));
  const base = `/api/v1/products/${encodeURIComponent(o.product)}/signing-keys`;
  return { client, base, query: `?org=${encodeURIComponent(await orgOf(client, o, io))}` };
}

async function keygen(o: { out: string; name: string; json?: boolean }, io: CliIo): Promise<number> {
  const name = o.name;
  mkdirSync(o.out, { recursive: true });
  const keyPath = path.join(o.out, `${name}.key`);
  const pubPath = path.join(o.out, `${name}.pub`);
  if (existsSync(keyPath)) throw new CliError(`${keyPath} already exists; choose another --name or --out`);
  const pair = generateSigningKeyPair();
  writeFileSync(keyPath, pair.privateKeyPem, { mode: 0o600, flag: 'wx' });
  writeFileSync(pubPath, pair.publicKeyPem);
  const { fingerprint } = parseSigningPublicKey(pair.publicKeyPem);
  if (o.json) printJson(io, { private_key: keyPath, public_key: pubPath, fingerprint });
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
  const tty = io.isTTY === true && process.stderr.isTTY;
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
