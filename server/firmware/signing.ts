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
 * - signed download URLs (HMAC-SHA256 with an expiry) for every download route: one signer, one
 *   verifier, one message layout, each route's URL shape (below);
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

/**
 * What a download URL grants, and to whom. The route is part of the signed message, so a URL
 * signed for one route is refused by every other. Routes whose client shows a certificate at
 * download time (Phoenix devices, GRiSP boards) get one URL per firmware, shared by a group: the
 * certificate says who downloads. Routes whose URL is the only credential (WiFiDogX gateways,
 * keyauth clients) bind it to the device too, and check its approval on every request.
 */
export type DownloadGrant =
  | { route: 'firmware' | 'grisp'; firmwareId: string }
  | { route: 'wifidogx' | 'keyauth'; firmwareId: string; deviceId: string };

export type DownloadRoute = DownloadGrant['route'];

/** The parts of a signed URL: expiry in unix seconds and the 64-hex HMAC (safe in paths and shells). */
export interface DownloadSignature {
  expires: number;
  sig: string;
}

/** Signs `grant` until `expiresAt` (rounded down to the second). */
export function signDownload(secret: string | Buffer, grant: DownloadGrant, expiresAt: Date): DownloadSignature {
  const expires = Math.floor(expiresAt.getTime() / 1000);
  return { expires, sig: downloadMac(secret, grant, expires) };
}

/**
 * The URL a device is sent, in its route's shape (each shape is what the device's software
 * expects; docs/firmware-downloads.md):
 * - `firmware`: `<base>/firmware/<id>?expires=<unix>&sig=<hmac>` (Phoenix devices, mutual TLS);
 * - `grisp`: `<base>/grisp/fw/<id>/<expires>/<hmac>`: the board appends `/MANIFEST.sealed` and
 *   block paths, so the signature lives in the path;
 * - `wifidogx`: `<base>/fw/<id>/<device>/<expires>/<hmac>`: the gateway passes the URL to a
 *   shell, so no `?`, `&`, `=` or `%`;
 * - `keyauth`: `<base>/api/keyauth/firmware/<id>?device=<id>&expires=<unix>&sig=<hmac>`.
 */
export function signDownloadUrl(input: {
  baseUrl: string;
  secret: string | Buffer;
  grant: DownloadGrant;
  expiresAt: Date;
}): string {
  const { expires, sig } = signDownload(input.secret, input.grant, input.expiresAt);
  const base = input.baseUrl.replace(/\/+$/, '');
  const g = input.grant;
  const id = encodeURIComponent(g.firmwareId);
  switch (g.route) {
    case 'firmware':
      return `${base}/firmware/${id}?expires=${expires}&sig=${sig}`;
    case 'grisp':
      return `${base}/grisp/fw/${id}/${expires}/${sig}`;
    case 'wifidogx':
      return `${base}/fw/${id}/${encodeURIComponent(g.deviceId)}/${expires}/${sig}`;
    case 'keyauth': {
      const device = encodeURIComponent(g.deviceId);
      return `${base}/api/keyauth/firmware/${id}?device=${device}&expires=${expires}&sig=${sig}`;
    }
  }
}

/** Why a download URL is refused; `malformed` when its expiry or signature is missing or not of the right form. */
export type DownloadRefusal = 'malformed' | 'bad_signature' | 'expired';

export type DownloadVerdict = { ok: true; expiresAt: Date } | { ok: false; reason: DownloadRefusal };

/**
 * Checks a request's `expires` and `sig` (from its path or query, hence `unknown`) against the
 * grant its other parts name. Constant-time comparison; expiry is checked after the MAC, so a
 * forged URL learns nothing about expiry.
 */
export function verifyDownload(
  secret: string | Buffer,
  grant: DownloadGrant,
  given: { expires: unknown; sig: unknown },
  now: Date = new Date(),
): DownloadVerdict {
  const { expires, sig } = given;
  const deviceId = 'deviceId' in grant ? grant.deviceId : '';
  // Ids come from the request's path: a newline in one could shift the signed fields.
  if (grant.firmwareId.includes('\n') || deviceId.includes('\n')) return { ok: false, reason: 'malformed' };
  if (
    typeof expires !== 'string' ||
    !/^\d{1,12}$/.test(expires) ||
    typeof sig !== 'string' ||
    !/^[0-9a-f]{64}$/.test(sig)
  )
    return { ok: false, reason: 'malformed' };
  const expected = Buffer.from(downloadMac(secret, grant, Number(expires)));
  if (!timingSafeEqual(expected, Buffer.from(sig))) return { ok: false, reason: 'bad_signature' };
  if (Number(expires) * 1000 <= now.getTime()) return { ok: false, reason: 'expired' };
  return { ok: true, expiresAt: new Date(Number(expires) * 1000) };
}

function downloadMac(secret: string | Buffer, grant: DownloadGrant, expires: number): string {
  // Segments never hold a newline; a grant without a device signs an empty device field.
  const deviceId = 'deviceId' in grant ? grant.deviceId : '';
  return createHmac('sha256', secret)
    .update(`fleethub-download\n${grant.route}\n${grant.firmwareId}\n${deviceId}\n${expires}`)
    .digest('hex');
}

/**
 * An expiry `ttlSeconds` from now, rounded up to a tenth of the TTL: a group's devices get
 * byte-identical URLs for a while (one encode per broadcast, cacheable).
 */
export function bucketedExpiry(ttlSeconds: number, now = Date.now()): Date {
  const ttlMs = ttlSeconds * 1000;
  const bucketMs = Math.max(1000, Math.floor(ttlMs / 10 / 1000) * 1000);
  return new Date(Math.ceil((now + ttlMs) / bucketMs) * bucketMs);
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
