import {
  createHash,
  createHmac,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  sign,
  timingSafeEqual,
  verify,
  type KeyObject,
} from 'node:crypto';

/**
 * Two kinds of signatures around firmware:
 * - signed download URLs (HMAC-SHA256, with an expiry) — one URL per firmware, shared by a whole
 *   group; the device's client certificate, not the URL, says who is downloading;
 * - detached ed25519 firmware signatures. The signed message is the image's raw 32-byte SHA-256
 *   digest, so server and device verify while streaming without holding the image in memory.
 */

export class SigningError extends Error {
  constructor(
    readonly code: 'SIGNING_KEY_INVALID' | 'SIGNATURE_MALFORMED',
    message: string,
  ) {
    super(message);
    this.name = 'SigningError';
  }
}

// --- signed download URLs ----------------------------------------------------------------

export interface SignFirmwareUrlInput {
  /** Public base URL of the device listener, e.g. `https://fleet.example:4001`. */
  baseUrl: string;
  secret: string | Buffer;
  firmwareId: string;
  expiresAt: Date;
}

/** `<base>/firmware/<id>?expires=<unix seconds>&sig=<base64url HMAC-SHA256>`. */
export function signFirmwareUrl(input: SignFirmwareUrlInput): string {
  const expires = Math.floor(input.expiresAt.getTime() / 1000);
  const sig = urlSignature(input.secret, input.firmwareId, expires);
  return `${input.baseUrl.replace(/\/+$/, '')}/firmware/${encodeURIComponent(input.firmwareId)}?expires=${expires}&sig=${sig}`;
}

export interface VerifyFirmwareUrlInput {
  secret: string | Buffer;
  firmwareId: string;
  expires: unknown;
  sig: unknown;
  now?: Date;
}

export type UrlVerdict =
  | { ok: true; expiresAt: Date }
  | { ok: false; reason: 'malformed' | 'bad_signature' | 'expired' };

/** Checks a download URL's `expires` and `sig` query parameters (constant-time comparison). */
export function verifyFirmwareUrl(input: VerifyFirmwareUrlInput): UrlVerdict {
  if (typeof input.expires !== 'string' || !/^\d{1,12}$/.test(input.expires) || typeof input.sig !== 'string') {
    return { ok: false, reason: 'malformed' };
  }
  const expires = Number(input.expires);
  const expected = Buffer.from(urlSignature(input.secret, input.firmwareId, expires));
  const given = Buffer.from(input.sig);
  if (given.length !== expected.length || !timingSafeEqual(given, expected))
    return { ok: false, reason: 'bad_signature' };
  // Checked after the MAC so an attacker learns nothing about expiry of forged URLs.
  if (expires * 1000 <= (input.now ?? new Date()).getTime()) return { ok: false, reason: 'expired' };
  return { ok: true, expiresAt: new Date(expires * 1000) };
}

function urlSignature(secret: string | Buffer, firmwareId: string, expires: number): string {
  return createHmac('sha256', secret).update(`fleethub-firmware-url\n${firmwareId}\n${expires}`).digest('base64url');
}

// --- ed25519 firmware signatures ---------------------------------------------------------

export interface SigningPublicKey {
  /** Normalised SPKI PEM. */
  pem: string;
  /** SHA-256 of the raw 32-byte public key, lowercase hex. */
  fingerprint: string;
}

/** Parses an ed25519 public key (SPKI PEM); SIGNING_KEY_INVALID for anything else. */
export function parseSigningPublicKey(pem: string): SigningPublicKey {
  let key: KeyObject;
  try {
    key = createPublicKey(pem);
  } catch {
    throw new SigningError(
      'SIGNING_KEY_INVALID',
      'the signing key is not a PEM public key; give the "-----BEGIN PUBLIC KEY-----" file from "fleethub firmware keygen"',
    );
  }
  if (key.asymmetricKeyType !== 'ed25519') {
    throw new SigningError(
      'SIGNING_KEY_INVALID',
      `firmware signing keys must be ed25519, got ${key.asymmetricKeyType ?? 'unknown'}; create one with "fleethub firmware keygen"`,
    );
  }
  const der = key.export({ type: 'spki', format: 'der' });
  return {
    pem: key.export({ type: 'spki', format: 'pem' }).toString(),
    fingerprint: createHash('sha256').update(der.subarray(-32)).digest('hex'),
  };
}

/** A fresh ed25519 key pair, PEM encoded (PKCS#8 private, SPKI public). */
export function generateSigningKeyPair(): { publicKeyPem: string; privateKeyPem: string } {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  return {
    publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(),
    privateKeyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
  };
}

/** Detached signature (base64) of an image given its SHA-256 hex digest. */
export function signFirmwareDigest(sha256: string, privateKeyPem: string): string {
  const key = createPrivateKey(privateKeyPem);
  if (key.asymmetricKeyType !== 'ed25519') {
    throw new SigningError(
      'SIGNING_KEY_INVALID',
      `firmware signing keys must be ed25519, got ${key.asymmetricKeyType ?? 'unknown'}; create one with "fleethub firmware keygen"`,
    );
  }
  return sign(null, digestBytes(sha256), key).toString('base64');
}

/**
 * Verifies a detached signature against any of `publicKeyPems`; returns the matching key's
 * index, or -1. SIGNATURE_MALFORMED when the signature is not 64 bytes of base64.
 */
export function verifyFirmwareSignature(sha256: string, signature: string, publicKeyPems: readonly string[]): number {
  const sig = decodeSignature(signature);
  const message = digestBytes(sha256);
  return publicKeyPems.findIndex((pem) => verify(null, message, createPublicKey(pem), sig));
}

function decodeSignature(signature: string): Buffer {
  const trimmed = signature.trim();
  const sig = /^[A-Za-z0-9+/_-]+={0,2}$/.test(trimmed) ? Buffer.from(trimmed, 'base64') : Buffer.alloc(0);
  if (sig.length !== 64) {
    throw new SigningError(
      'SIGNATURE_MALFORMED',
      'the firmware signature must be a base64 ed25519 signature (64 bytes); create it with "fleethub firmware sign <file> --key key.pem"',
    );
  }
  return sig;
}

function digestBytes(sha256: string): Buffer {
  if (!/^[0-9a-f]{64}$/i.test(sha256)) throw new TypeError(`not a SHA-256 hex digest: ${JSON.stringify(sha256)}`);
  return Buffer.from(sha256, 'hex');
}
