/**
 * GRiSP update packages. grisp_updater fetches `<url>/MANIFEST.sealed` and then each block file
 * the manifest lists, at `<url>/<path>`. An operator uploads the package as ONE uncompressed tar
 * archive (ustar/pax/GNU long names) holding `MANIFEST.sealed` at its root and the block files
 * under their relative paths; the blob store keeps the archive as is, and each member is served
 * as a byte range of it (the index of members is read once per archive and cached).
 */
import type { Readable } from 'node:stream';

export const GRISP_FORMAT = 'grisp';
export const MANIFEST_NAME = 'MANIFEST.sealed';
const MAX_MEMBERS = 20_000;
/** Member paths: relative, `/`-separated, no `..`, only characters that need no URL escaping. */
const MEMBER_PATH = /^(?!.*(?:^|\/)\.\.?(?:\/|$))[A-Za-z0-9._-]+(?:\/[A-Za-z0-9._-]+)*$/;

export interface PackageMember {
  /** Offset of the member's bytes in the archive. */
  offset: number;
  size: number;
}

export type PackageIndex = Map<string, PackageMember>;

export class GrispPackageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GrispPackageError';
  }
}

/**
 * Reads the tar headers of an archive stream (skipping the data) into a member index; validates
 * the layout. The stream is closed when done: reading stops at the end-of-archive marker, and an
 * unfinished file stream would keep its descriptor until garbage collection.
 */
export async function indexGrispPackage(source: Readable | AsyncIterable<Uint8Array>): Promise<PackageIndex> {
  const reader = new ChunkReader(source);
  try {
    return await readIndex(reader);
  } finally {
    await reader.close();
  }
}

async function readIndex(reader: ChunkReader): Promise<PackageIndex> {
  const index: PackageIndex = new Map();
  let pending: { path?: string } = {};
  for (;;) {
    const header = await reader.read(512);
    if (!header)
      throw new GrispPackageError(
        'the archive ends without the tar end-of-archive marker; upload an uncompressed tar file',
      );
    if (header.every((b) => b === 0)) break;
    if (!checksumOk(header))
      throw new GrispPackageError(
        'not a tar archive (bad header checksum); upload an uncompressed .tar of the package directory (gzip is not accepted)',
      );
    const size = parseSize(header.subarray(124, 136));
    const type = String.fromCharCode(header[156]!);
    const dataOffset = reader.position;
    const padded = Math.ceil(size / 512) * 512;
    if (type === 'x' || type === 'L') {
      if (size > 64 * 1024) throw new GrispPackageError('a tar extended header is larger than 64 KiB');
      const data = await reader.read(padded);
      if (!data) throw new GrispPackageError('the archive is truncated');
      const body = data.subarray(0, size).toString('utf8');
      if (type === 'L') pending.path = body.replace(/\0+$/, '');
      else {
        const path = /(?:^|\n)\d+ path=([^\n]*)\n/.exec(body)?.[1];
        if (path !== undefined) pending.path = path;
      }
      continue;
    }
    if (type === 'g') {
      await reader.skip(padded);
      continue;
    }
    const name = pending.path ?? headerName(header);
    pending = {};
    await reader.skip(padded);
    if (type === '5') continue; // directories carry no bytes
    const path = name.replace(/^\.\//, '');
    if (type !== '0' && type !== '\0' && type !== '7')
      throw new GrispPackageError(
        `member ${JSON.stringify(path)} is not a regular file (links and devices are not allowed)`,
      );
    if (!MEMBER_PATH.test(path))
      throw new GrispPackageError(
        `member path ${JSON.stringify(path)} is not allowed: use relative paths of letters, digits, '.', '_', '-' and '/'`,
      );
    if (index.has(path)) throw new GrispPackageError(`member ${JSON.stringify(path)} appears twice`);
    index.set(path, { offset: dataOffset, size });
    if (index.size > MAX_MEMBERS) throw new GrispPackageError(`the package has more than ${MAX_MEMBERS} members`);
  }
  if (!index.has(MANIFEST_NAME))
    throw new GrispPackageError(
      `the package has no ${MANIFEST_NAME} at its root; build it with grisp_updater_tools (rebar3 grisp-io deploy) and tar the directory contents`,
    );
  return index;
}

function headerName(header: Buffer): string {
  const name = cString(header.subarray(0, 100));
  const magic = header.subarray(257, 262).toString('latin1');
  const prefix = magic === 'ustar' ? cString(header.subarray(345, 500)) : '';
  return prefix ? `${prefix}/${name}` : name;
}

function cString(b: Buffer): string {
  const end = b.indexOf(0);
  return b.subarray(0, end < 0 ? b.length : end).toString('utf8');
}

function parseSize(field: Buffer): number {
  // GNU base-256 for sizes past 8 GiB.
  if (field[0]! & 0x80) {
    let n = 0;
    for (let i = 1; i < field.length; i++) n = n * 256 + field[i]!;
    return n;
  }
  const text = cString(field).trim();
  const n = text === '' ? 0 : parseInt(text, 8);
  if (!Number.isSafeInteger(n) || n < 0) throw new GrispPackageError('a tar header has an invalid size');
  return n;
}

function checksumOk(header: Buffer): boolean {
  const stored = parseInt(cString(header.subarray(148, 156)).trim(), 8);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 32 : header[i]!;
  return stored === sum;
}

/** Pull-style reads over a byte stream, tracking the absolute position. */
class ChunkReader {
  #iterator: AsyncIterator<Uint8Array>;
  #buffer = Buffer.alloc(0);
  #done = false;
  position = 0;

  constructor(source: Readable | AsyncIterable<Uint8Array>) {
    this.#iterator = (source as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
  }

  async #fill(n: number): Promise<boolean> {
    while (this.#buffer.length < n && !this.#done) {
      const next = await this.#iterator.next();
      if (next.done) this.#done = true;
      else this.#buffer = this.#buffer.length ? Buffer.concat([this.#buffer, next.value]) : Buffer.from(next.value);
    }
    return this.#buffer.length >= n;
  }

  /** Ends the source (a Readable's iterator destroys the stream). */
  async close(): Promise<void> {
    if (!this.#done) await this.#iterator.return?.();
    this.#done = true;
  }

  async read(n: number): Promise<Buffer | undefined> {
    if (!(await this.#fill(n))) return undefined;
    const out = this.#buffer.subarray(0, n);
    this.#buffer = this.#buffer.subarray(n);
    this.position += n;
    return out;
  }

  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.#buffer.length === 0 && !(await this.#fill(1))) throw new GrispPackageError('the archive is truncated');
      const take = Math.min(left, this.#buffer.length);
      this.#buffer = this.#buffer.subarray(take);
      this.position += take;
      left -= take;
    }
  }
}
