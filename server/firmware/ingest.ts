import type { Readable } from 'node:stream';
import { audit, type Actor } from '../audit.ts';
import type { Firmware } from '../db/schema.ts';
import type { FleetContext } from '../fleet/context.ts';
import { createFirmware, deleteFirmware, isBlobReferenced } from '../fleet/firmware.ts';
import type { Product } from '../fleet/orgs.ts';
import type { BlobStore } from './blob-store.ts';
import { signingKeyPems } from './signing-keys.ts';
import { SigningError, verifyFirmwareSignature } from './signing.ts';

/**
 * Firmware intake, transport-free: stream an image into the blob store, refuse duplicates and
 * bad signatures, record it through the fleet domain. The REST route and tests call this.
 */

export interface FirmwareStoreDeps {
  fleet: FleetContext;
  blobs: BlobStore;
  /** Largest image accepted (default 2 GiB). */
  maxImageBytes?: number;
}

export interface FirmwareMetadata {
  version: string;
  component?: string;
  platform?: string | null;
  architecture?: string | null;
  format?: string;
  /** Firmware UUID to use (fwup `meta-uuid`); generated when absent. */
  uuid?: string;
  /** Detached ed25519 signature (base64) over the image's SHA-256 digest. */
  signature?: string | null;
  metadata?: Record<string, unknown>;
}

export type FirmwareErrorCode =
  | 'duplicate_version'
  | 'signature_required'
  | 'signature_invalid'
  | 'no_signing_keys'
  | 'image_too_large'
  | 'image_empty';

export class FirmwareError extends Error {
  constructor(
    readonly status: number,
    readonly code: FirmwareErrorCode,
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
    this.name = 'FirmwareError';
  }
}

export const DEFAULT_MAX_IMAGE_BYTES = 2 * 1024 ** 3;

/**
 * Stores the image streamed from `body` and records it. A release (product+component+version)
 * holds one record per package format: another format of an existing version adds a variant;
 * the same format with identical bytes answers the existing record (`created: false`), with
 * different bytes → 409.
 */
export async function ingestFirmware(
  deps: FirmwareStoreDeps,
  actor: Actor,
  product: Product,
  meta: FirmwareMetadata,
  body: Readable | AsyncIterable<Uint8Array>,
): Promise<{ firmware: Firmware; created: boolean }> {
  const component = meta.component ?? 'firmware';
  const format = meta.format ?? 'raw';
  const { sha256, size } = await deps.blobs
    .put(body, { maxBytes: deps.maxImageBytes ?? DEFAULT_MAX_IMAGE_BYTES })
    .catch((err: unknown) => {
      if ((err as { code?: string }).code === 'BLOB_TOO_LARGE')
        throw new FirmwareError(413, 'image_too_large', (err as Error).message);
      throw err;
    });
  // The blob may be shared with other firmware rows: only remove it when nothing else uses it.
  const discard = async () => {
    if (!(await isBlobReferenced(deps.fleet, sha256))) await deps.blobs.delete(sha256);
  };
  try {
    if (size === 0)
      throw new FirmwareError(
        400,
        'image_empty',
        'the uploaded image is empty; send the firmware file as the request body (application/octet-stream)',
      );
    const existing = await findVersion(deps.fleet, product.id, component, meta.version, format);
    if (existing) {
      if (existing.has_blob && existing.sha256 === sha256) return { firmware: existing, created: false };
      // Registered without an image so far (metadata of firmware stored elsewhere): the upload supplies it.
      if (!existing.has_blob && (existing.sha256 === null || existing.sha256 === sha256)) {
        const signature = await checkSignature(deps.fleet, product, sha256, meta.signature);
        return { firmware: await attachBlob(deps.fleet, actor, existing, { sha256, size, signature }), created: false };
      }
      throw duplicate(existing, sha256);
    }
    const signature = await checkSignature(deps.fleet, product, sha256, meta.signature);
    const firmware = await createFirmware(deps.fleet, actor, {
      orgId: product.org_id,
      productId: product.id,
      uuid: meta.uuid,
      component,
      version: meta.version,
      platform: meta.platform ?? null,
      architecture: meta.architecture ?? null,
      format: meta.format,
      sha256,
      size,
      signature,
      metadata: meta.metadata,
      hasBlob: true,
    });
    return { firmware, created: true };
  } catch (err) {
    await discard().catch((e: unknown) =>
      deps.fleet.log.error({ err: e, sha256 }, 'removing an unused firmware blob failed'),
    );
    // A concurrent upload of the same version won the insert: answer like a duplicate.
    if (
      (err as { name?: string; code?: string }).name === 'FleetError' &&
      (err as { code?: string }).code === 'conflict'
    ) {
      const winner = await findVersion(deps.fleet, product.id, component, meta.version, format);
      if (winner?.has_blob && winner.sha256 === sha256) return { firmware: winner, created: false };
      if (winner) throw duplicate(winner, sha256);
    }
    throw err;
  }
}

/** Records firmware built and stored elsewhere (no blob): metadata only, signature checked when given with a digest. */
export async function registerFirmwareMetadata(
  deps: FirmwareStoreDeps,
  actor: Actor,
  product: Product,
  meta: FirmwareMetadata & { sha256?: string | null; size?: number | null },
): Promise<Firmware> {
  let signature = meta.signature ?? null;
  if (signature && meta.sha256) signature = await checkSignature(deps.fleet, product, meta.sha256, signature);
  return createFirmware(deps.fleet, actor, {
    orgId: product.org_id,
    productId: product.id,
    uuid: meta.uuid,
    component: meta.component,
    version: meta.version,
    platform: meta.platform ?? null,
    architecture: meta.architecture ?? null,
    format: meta.format,
    sha256: meta.sha256 ?? null,
    size: meta.size ?? null,
    signature,
    metadata: meta.metadata,
    hasBlob: false,
  });
}

/**
 * Verifies `signature` against the product's registered keys: required when the product says so,
 * checked whenever one is given. Returns the normalised signature (or null).
 */
export async function checkSignature(
  fleet: FleetContext,
  product: Product,
  sha256: string,
  signature: string | null | undefined,
): Promise<string | null> {
  const given = signature?.trim() || null;
  if (!given) {
    if (product.requires_signature) {
      throw new FirmwareError(
        400,
        'signature_required',
        `product ${product.name} requires signed firmware; sign the image ("fleethub firmware sign <file> --key key.pem") and upload it with --sign-key or the signature parameter`,
      );
    }
    return null;
  }
  const keys = await signingKeyPems(fleet.db, product.id);
  if (keys.length === 0) {
    throw new FirmwareError(
      400,
      'no_signing_keys',
      `product ${product.name} has no signing keys to verify the signature with; register the public key first ("fleethub firmware keys add")`,
    );
  }
  let match: number;
  try {
    match = verifyFirmwareSignature(sha256, given, keys);
  } catch (err) {
    if (err instanceof SigningError) throw new FirmwareError(400, 'signature_invalid', err.message);
    throw err;
  }
  if (match < 0) {
    throw new FirmwareError(
      400,
      'signature_invalid',
      `the signature does not verify against any of product ${product.name}'s ${keys.length} signing key(s); sign with a registered key or register its public key`,
    );
  }
  return given;
}

/** Deletes the firmware blob when no firmware record references its sha256 any more. */
export async function deleteFirmwareBlobIfUnreferenced(
  deps: Pick<FirmwareStoreDeps, 'fleet' | 'blobs'>,
  firmware: Pick<Firmware, 'sha256' | 'has_blob'>,
): Promise<boolean> {
  if (!firmware.has_blob || !firmware.sha256) return false;
  if (await isBlobReferenced(deps.fleet, firmware.sha256)) return false;
  return deps.blobs.delete(firmware.sha256);
}

/** Deletes a firmware record through the domain (refused while targeted), then its blob if unshared. */
export async function deleteFirmwareAndBlob(
  deps: Pick<FirmwareStoreDeps, 'fleet' | 'blobs'>,
  actor: Actor,
  orgId: string,
  firmwareId: string,
): Promise<Firmware> {
  const firmware = await deleteFirmware(deps.fleet, actor, orgId, firmwareId);
  await deleteFirmwareBlobIfUnreferenced(deps, firmware);
  return firmware;
}

async function attachBlob(
  fleet: FleetContext,
  actor: Actor,
  firmware: Firmware,
  blob: { sha256: string; size: number; signature: string | null },
): Promise<Firmware> {
  return fleet.db.transaction().execute(async (trx) => {
    const row = await trx
      .updateTable('firmware')
      .set({ sha256: blob.sha256, size: blob.size, signature: blob.signature, has_blob: true })
      .where('id', '=', firmware.id)
      .where('has_blob', '=', false)
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId: firmware.org_id,
      action: 'firmware.attach_image',
      resourceType: 'firmware',
      resourceId: firmware.id,
      details: { version: firmware.version, sha256: blob.sha256, size: blob.size },
    });
    return row;
  });
}

async function findVersion(
  fleet: FleetContext,
  productId: string,
  component: string,
  version: string,
  format: string,
): Promise<Firmware | undefined> {
  return fleet.db
    .selectFrom('firmware')
    .selectAll()
    .where('product_id', '=', productId)
    .where('component', '=', component)
    .where('version', '=', version)
    .where('format', '=', format)
    .executeTakeFirst();
}

function duplicate(existing: Firmware, sha256: string): FirmwareError {
  return new FirmwareError(
    409,
    'duplicate_version',
    `${existing.component} ${existing.version} (format ${existing.format}) already exists for this product with different content (sha256 ${existing.sha256 ?? 'unknown'}); bump the version`,
    { firmware_id: existing.id, format: existing.format, existing_sha256: existing.sha256, uploaded_sha256: sha256 },
  );
}
