import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, open, readdir, rename, rm, stat, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

/** What the store knows of one blob. */
export interface BlobInfo {
  sha256: string;
  size: number;
}

/** An inclusive byte range, as HTTP `Range: bytes=start-end` means it. */
export interface ByteRange {
  start: number;
  end: number;
}

export interface PutOptions {
  /** Refuse (BLOB_TOO_LARGE) once more than this many bytes arrived. */
  maxBytes?: number;
}

/**
 * Content-addressed firmware storage. Blobs are named by their SHA-256, computed while the
 * bytes stream in; nothing holds a whole image in memory. An object store can implement this.
 */
export interface BlobStore {
  /** Streams `source` into the store and returns its digest and size; identical bytes share one blob. */
  put(source: Readable | AsyncIterable<Uint8Array>, options?: PutOptions): Promise<BlobInfo>;
  /** A readable stream of the blob (or of `range` of it); BLOB_NOT_FOUND when absent. */
  open(sha256: string, range?: ByteRange): Promise<Readable>;
  stat(sha256: string): Promise<BlobInfo | null>;
  /** Reads at positions into the caller's buffers (optional: stores that only stream leave it out). */
  reader?(sha256: string): Promise<BlobReader>;
  /** Removes the blob; false when it was not there. */
  delete(sha256: string): Promise<boolean>;
}

/** An open blob read at positions into buffers the caller reuses; close it when done. */
export interface BlobReader {
  readonly size: number;
  /** Reads up to `length` bytes at `position` into the start of `buffer`; 0 at the end. */
  read(buffer: Buffer, length: number, position: number): Promise<number>;
  close(): Promise<void>;
}

export class BlobStoreError extends Error {
  constructor(
    readonly code: 'BLOB_NOT_FOUND' | 'BLOB_TOO_LARGE' | 'BLOB_BAD_DIGEST',
    message: string,
  ) {
    super(message);
    this.name = 'BlobStoreError';
  }
}

const SHA256_HEX = /^[0-9a-f]{64}$/;

/** Blobs as files `<dir>/<aa>/<sha256>`, written to `<dir>/tmp/` first and renamed into place atomically. */
export class LocalBlobStore implements BlobStore {
  readonly #dir: string;

  constructor(dir: string) {
    this.#dir = path.resolve(dir);
  }

  get dir(): string {
    return this.#dir;
  }

  /** Where the blob lives on disk (tests tamper with it; nothing else should need it). */
  pathOf(sha256: string): string {
    assertDigest(sha256);
    return path.join(this.#dir, sha256.slice(0, 2), sha256);
  }

  get #tmpDir(): string {
    return path.join(this.#dir, 'tmp');
  }

  /**
   * Removes the partial uploads a killed process left in `<dir>/tmp/`: the `.part` files not
   * written to for `olderThanMs` (0: all of them, when no other process can be writing here).
   * Returns how many went.
   */
  async removeAbandonedUploads(olderThanMs: number): Promise<number> {
    const names = await readdir(this.#tmpDir).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return [];
      throw err;
    });
    const cutoff = Date.now() - olderThanMs;
    let removed = 0;
    for (const name of names) {
      if (!name.endsWith('.part')) continue;
      const file = path.join(this.#tmpDir, name);
      const s = await stat(file).catch(() => undefined);
      if (!s?.isFile() || (olderThanMs > 0 && s.mtimeMs > cutoff)) continue;
      await rm(file, { force: true });
      removed++;
    }
    return removed;
  }

  async put(source: Readable | AsyncIterable<Uint8Array>, options: PutOptions = {}): Promise<BlobInfo> {
    const tmpDir = this.#tmpDir;
    await mkdir(tmpDir, { recursive: true });
    const tmp = path.join(tmpDir, `${Date.now()}-${randomBytes(8).toString('hex')}.part`);
    const hash = createHash('sha256');
    let size = 0;
    const maxBytes = options.maxBytes ?? Number.POSITIVE_INFINITY;
    try {
      await pipeline(
        source,
        async function* digest(chunks: AsyncIterable<Uint8Array>) {
          for await (const chunk of chunks) {
            size += chunk.byteLength;
            if (size > maxBytes)
              throw new BlobStoreError('BLOB_TOO_LARGE', `the image is larger than the ${maxBytes}-byte limit`);
            hash.update(chunk);
            yield chunk;
          }
        },
        createWriteStream(tmp, { flags: 'wx' }),
      );
      // Durable before it becomes visible under its name.
      const handle = await open(tmp, 'r');
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
      const sha256 = hash.digest('hex');
      const final = this.pathOf(sha256);
      await mkdir(path.dirname(final), { recursive: true });
      // Same name means same bytes: replacing an existing blob is harmless and atomic.
      await rename(tmp, final);
      return { sha256, size };
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
  }

  async open(sha256: string, range?: ByteRange): Promise<Readable> {
    // Opened before the stream exists so a missing file fails here, not mid-response.
    const handle = await this.#openFile(sha256);
    return handle.createReadStream({
      start: range?.start,
      end: range?.end,
      highWaterMark: 256 * 1024,
      autoClose: true,
    });
  }

  async reader(sha256: string): Promise<BlobReader> {
    const handle = await this.#openFile(sha256);
    const { size } = await handle.stat().catch(async (err: unknown) => {
      await handle.close();
      throw err;
    });
    return {
      size,
      read: async (buffer, length, position) => (await handle.read(buffer, 0, length, position)).bytesRead,
      close: () => handle.close(),
    };
  }

  async #openFile(sha256: string): Promise<FileHandle> {
    return open(this.pathOf(sha256), 'r').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT')
        throw new BlobStoreError(
          'BLOB_NOT_FOUND',
          `firmware blob ${sha256} is not in the store; upload the image again`,
        );
      throw err;
    });
  }

  async stat(sha256: string): Promise<BlobInfo | null> {
    try {
      const s = await stat(this.pathOf(sha256));
      return { sha256, size: s.size };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
  }

  async delete(sha256: string): Promise<boolean> {
    try {
      await unlink(this.pathOf(sha256));
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
  }
}

function assertDigest(sha256: string): void {
  // The digest becomes a path: anything but 64 hex digits could escape the directory.
  if (!SHA256_HEX.test(sha256))
    throw new BlobStoreError('BLOB_BAD_DIGEST', `${JSON.stringify(sha256)} is not a lowercase hex SHA-256 digest`);
}
