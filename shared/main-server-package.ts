/**
 * Main Server update packages: a ZIP whose root holds `device_update.json`, the manifest
 *
 *   {"extension": "ExtensionName", "version": "1.1.0", "compatible_with": ">=1.0.0 <2.0.0",
 *    "description": "...", "install": "install.sh"}
 *
 * (`name` is accepted for `extension`). `compatible_with` is a semver range the version the
 * device runs must satisfy (absent: any). Validation reads the ZIP's central directory with yauzl
 * and only inflates the manifest. `createZip` builds packages (CLI `pack`, simulators, tests).
 */
import { crc32, deflateRawSync } from 'node:zlib';
import semver from 'semver';
import yauzl from 'yauzl';

export const MANIFEST_NAME = 'device_update.json';
export const PACKAGE_FORMAT = 'main-server-zip';
const MAX_MANIFEST_BYTES = 64 * 1024;
const MAX_ENTRIES = 10_000;
/** Extension names become fleet components and the managed group `ext-<name>`. */
const EXTENSION_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,58}$/;

export interface PackageManifest {
  extension: string;
  version: string;
  compatible_with: string | null;
  description: string | null;
  install: string | null;
}

export class PackageError extends Error {
  constructor(
    readonly code: 'not_a_zip' | 'manifest_missing' | 'manifest_invalid' | 'unsafe_entry' | 'too_many_entries',
    message: string,
  ) {
    super(message);
    this.name = 'PackageError';
  }
}

/** Whether `name` may name an extension (a fleet component). */
export function validExtensionName(name: unknown): name is string {
  return typeof name === 'string' && EXTENSION_NAME.test(name);
}

/** Checks a manifest object; throws `manifest_invalid` naming the field to fix. */
export function parseManifest(value: unknown): PackageManifest {
  const bad = (message: string) => new PackageError('manifest_invalid', `${MANIFEST_NAME}: ${message}`);
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw bad('must be a JSON object');
  const m = value as Record<string, unknown>;
  const extension = m.extension ?? m.name;
  if (!validExtensionName(extension))
    throw bad("\"extension\" must be 1-59 letters, digits, '_', '.', '-' (it names the component on the device)");
  if (typeof m.version !== 'string' || semver.valid(m.version) === null)
    throw bad('"version" must be a semantic version such as 1.1.0');
  let compatible: string | null = null;
  if (m.compatible_with !== undefined && m.compatible_with !== null) {
    if (typeof m.compatible_with !== 'string' || semver.validRange(m.compatible_with) === null)
      throw bad('"compatible_with" must be a semver range such as ">=1.0.0 <2.0.0"');
    compatible = m.compatible_with;
  }
  const optional = (key: string): string | null => {
    const v = m[key];
    if (v === undefined || v === null) return null;
    if (typeof v !== 'string' || v.length > 1000) throw bad(`"${key}" must be a string of at most 1000 characters`);
    return v;
  };
  return {
    extension,
    version: m.version,
    compatible_with: compatible,
    description: optional('description'),
    install: optional('install'),
  };
}

/** Whether a device running `current` may install a package declaring `range` (no range: yes; unknown current: no). */
export function isCompatible(range: string | null | undefined, current: string | null | undefined): boolean {
  if (!range) return true;
  if (!current || semver.valid(current) === null) return false;
  return semver.satisfies(current, range, { includePrerelease: true });
}

/** Validates the ZIP at `file` and returns its manifest. Throws `PackageError`. */
export async function readPackageFile(file: string): Promise<PackageManifest> {
  let zip: yauzl.ZipFile;
  try {
    zip = await yauzl.openPromise(file, {
      lazyEntries: true,
      autoClose: false,
      strictFileNames: false,
      validateEntrySizes: true,
    } as yauzl.Options);
  } catch (err) {
    throw new PackageError(
      'not_a_zip',
      `the package is not a readable ZIP archive (${(err as Error).message}); build it with "fleethub main-server pack <dir>"`,
    );
  }
  try {
    return await manifestOf(zip);
  } finally {
    zip.close();
  }
}

/** Validates a ZIP held in memory (device side, tests). */
export async function readPackageBuffer(buffer: Buffer): Promise<PackageManifest> {
  let zip: yauzl.ZipFile;
  try {
    zip = await yauzl.fromBufferPromise(buffer, { lazyEntries: true });
  } catch (err) {
    throw new PackageError('not_a_zip', `the package is not a readable ZIP archive (${(err as Error).message})`);
  }
  try {
    return await manifestOf(zip);
  } finally {
    zip.close();
  }
}

async function manifestOf(zip: yauzl.ZipFile): Promise<PackageManifest> {
  if (zip.entryCount > MAX_ENTRIES)
    throw new PackageError(
      'too_many_entries',
      `the package has ${zip.entryCount} entries; at most ${MAX_ENTRIES} are allowed`,
    );
  let manifest: PackageManifest | undefined;
  try {
    for await (const entry of zip.eachEntry()) {
      // yauzl refuses absolute paths and `..` itself; backslashes and drive letters are refused here too.
      if (/\\|^[A-Za-z]:/.test(entry.fileName))
        throw new PackageError(
          'unsafe_entry',
          `the package entry ${JSON.stringify(entry.fileName)} is not a safe relative path`,
        );
      if (entry.isEncrypted())
        throw new PackageError(
          'unsafe_entry',
          `the package entry ${JSON.stringify(entry.fileName)} is encrypted; packages must not be`,
        );
      if (entry.fileName !== MANIFEST_NAME) continue;
      if (entry.uncompressedSize > MAX_MANIFEST_BYTES)
        throw new PackageError('manifest_invalid', `${MANIFEST_NAME} is larger than ${MAX_MANIFEST_BYTES} bytes`);
      const text = await readEntry(zip, entry);
      let parsed: unknown;
      try {
        parsed = JSON.parse(text);
      } catch {
        throw new PackageError('manifest_invalid', `${MANIFEST_NAME} is not valid JSON`);
      }
      manifest = parseManifest(parsed);
    }
  } catch (err) {
    if (err instanceof PackageError) throw err;
    throw new PackageError('not_a_zip', `the package is a damaged ZIP archive (${(err as Error).message})`);
  }
  if (!manifest)
    throw new PackageError(
      'manifest_missing',
      `the package has no ${MANIFEST_NAME} at its root; add one with {"extension", "version"}`,
    );
  return manifest;
}

async function readEntry(zip: yauzl.ZipFile, entry: yauzl.Entry): Promise<string> {
  const stream = await zip.openReadStreamPromise(entry);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_MANIFEST_BYTES)
      throw new PackageError('manifest_invalid', `${MANIFEST_NAME} is larger than ${MAX_MANIFEST_BYTES} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/** Extracts every file entry of a ZIP in memory: name → bytes (device side). */
export async function extractZip(buffer: Buffer): Promise<Map<string, Buffer>> {
  const zip = await yauzl.fromBufferPromise(buffer, { lazyEntries: true });
  const files = new Map<string, Buffer>();
  try {
    for await (const entry of zip.eachEntry()) {
      if (entry.fileName.endsWith('/')) continue;
      const stream = await zip.openReadStreamPromise(entry);
      const chunks: Buffer[] = [];
      for await (const chunk of stream as AsyncIterable<Buffer>) chunks.push(chunk);
      files.set(entry.fileName, Buffer.concat(chunks));
    }
  } finally {
    zip.close();
  }
  return files;
}

/** Builds a ZIP (deflated entries, no directories entries needed) from name → bytes. */
export function createZip(files: ReadonlyArray<{ name: string; data: Buffer | string }>): Buffer {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  for (const file of files) {
    const name = Buffer.from(file.name, 'utf8');
    const data = typeof file.data === 'string' ? Buffer.from(file.data, 'utf8') : file.data;
    const deflated = deflateRawSync(data);
    const useDeflate = deflated.length < data.length;
    const body = useDeflate ? deflated : data;
    const crc = crc32(data) >>> 0;
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4);
    local.writeUInt16LE(0x0800, 6); // UTF-8 names
    local.writeUInt16LE(useDeflate ? 8 : 0, 8);
    local.writeUInt32LE(0, 10); // time, date
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(body.length, 18);
    local.writeUInt32LE(data.length, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(0, 28);
    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE(20, 4);
    central.writeUInt16LE(20, 6);
    central.writeUInt16LE(0x0800, 8);
    central.writeUInt16LE(useDeflate ? 8 : 0, 10);
    central.writeUInt32LE(0, 12);
    central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(body.length, 20);
    central.writeUInt32LE(data.length, 24);
    central.writeUInt16LE(name.length, 28);
    central.writeUInt32LE(offset, 42);
    locals.push(local, name, body);
    centrals.push(central, name);
    offset += local.length + name.length + body.length;
  }
  const centralSize = centrals.reduce((n, b) => n + b.length, 0);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(files.length, 8);
  end.writeUInt16LE(files.length, 10);
  end.writeUInt32LE(centralSize, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, ...centrals, end]);
}
