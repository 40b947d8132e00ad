/**
 * The keyauth protocol's hybrid envelope, pure (no I/O, no logger): a JSON body encrypted with AES-256-GCM
 * under a fresh random key, that key wrapped with RSA-OAEP-SHA256 to the receiver's public key.
 *
 *   {"enc": {"key": b64(RSA-OAEP(aesKey)), "iv": b64(12 bytes), "ct": b64(ciphertext), "tag": b64(16 bytes)}}
 *
 * Client keys are RSA-2048 (SPKI PEM); the server's key pair is generated at every start.
 */
import {
  constants,
  createCipheriv,
  createDecipheriv,
  createHash,
  createPublicKey,
  generateKeyPairSync,
  privateDecrypt,
  publicEncrypt,
  randomBytes,
  type KeyObject,
} from 'node:crypto';

export interface Envelope {
  enc: { key: string; iv: string; ct: string; tag: string };
}

export class EnvelopeError extends Error {
  constructor(
    readonly type: 'NotEncrypted' | 'MalformedEnvelope' | 'DecryptionFailed' | 'InvalidJson',
    message: string,
  ) {
    super(message);
    this.name = 'EnvelopeError';
  }
}

export class KeyError extends Error {
  override readonly name = 'KeyError';
}

const IV_BYTES = 12;
const TAG_BYTES = 16;
const AES_KEY_BYTES = 32;
const RSA_BITS = 2048;
const B64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** A fresh RSA-2048 key pair (the server makes one per run; clients keep theirs). */
export function generateRsaKeyPair(): { publicKey: KeyObject; privateKey: KeyObject; publicKeyPem: string } {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: RSA_BITS });
  return { publicKey, privateKey, publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString() };
}

/**
 * Parses a client's public key: RSA, exactly 2048 bits, SPKI PEM. Returns the key, its normalised
 * PEM and the SHA-256 fingerprint (hex) of its DER encoding, which identifies the client.
 */
export function parseClientKey(pem: unknown): { key: KeyObject; pem: string; fingerprint: string } {
  if (typeof pem !== 'string' || pem.length > 4096 || !pem.includes('-----BEGIN PUBLIC KEY-----')) {
    throw new KeyError('data.key must be an RSA-2048 public key in SPKI PEM ("-----BEGIN PUBLIC KEY-----")');
  }
  let key: KeyObject;
  try {
    key = createPublicKey({ key: pem, format: 'pem' });
  } catch {
    throw new KeyError('data.key is not a readable PEM public key');
  }
  if (key.asymmetricKeyType !== 'rsa' || key.asymmetricKeyDetails?.modulusLength !== RSA_BITS) {
    throw new KeyError(
      `data.key must be an RSA key of ${RSA_BITS} bits (got ${key.asymmetricKeyType} ${key.asymmetricKeyDetails?.modulusLength ?? '?'})`,
    );
  }
  const der = key.export({ type: 'spki', format: 'der' });
  return { key, pem: key.export({ type: 'spki', format: 'pem' }).toString(), fingerprint: fingerprintOf(der) };
}

/** SHA-256 of the SPKI DER, lowercase hex: how operators name a client key. */
export function fingerprintOf(spkiDer: Buffer): string {
  return createHash('sha256').update(spkiDer).digest('hex');
}

/** Encrypts `body` (JSON) to `recipient`. */
export function seal(recipient: KeyObject, body: unknown): Envelope {
  const aesKey = randomBytes(AES_KEY_BYTES);
  const iv = randomBytes(IV_BYTES);
  const cipher = createCipheriv('aes-256-gcm', aesKey, iv);
  const ct = Buffer.concat([cipher.update(JSON.stringify(body), 'utf8'), cipher.final()]);
  const key = publicEncrypt({ key: recipient, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, aesKey);
  return {
    enc: {
      key: key.toString('base64'),
      iv: iv.toString('base64'),
      ct: ct.toString('base64'),
      tag: cipher.getAuthTag().toString('base64'),
    },
  };
}

/** True when `message` has the envelope's shape (it may still fail to open). */
export function isEnvelope(message: unknown): message is Envelope {
  return typeof message === 'object' && message !== null && 'enc' in message;
}

/** Opens an envelope with our private key and parses its JSON body. Throws `EnvelopeError`. */
export function open(privateKey: KeyObject, message: unknown): unknown {
  if (!isEnvelope(message))
    throw new EnvelopeError(
      'NotEncrypted',
      'after code 103 every message must be an envelope {"enc": {key, iv, ct, tag}} encrypted to the server key',
    );
  const enc = (message as { enc: unknown }).enc as Record<string, unknown> | null;
  const field = (name: string): Buffer => {
    const value = enc?.[name];
    if (typeof value !== 'string' || !B64.test(value))
      throw new EnvelopeError('MalformedEnvelope', `enc.${name} must be a base64 string`);
    return Buffer.from(value, 'base64');
  };
  if (typeof enc !== 'object' || enc === null)
    throw new EnvelopeError('MalformedEnvelope', 'enc must be an object {key, iv, ct, tag}');
  const wrapped = field('key');
  const iv = field('iv');
  const ct = field('ct');
  const tag = field('tag');
  if (iv.length !== IV_BYTES) throw new EnvelopeError('MalformedEnvelope', `enc.iv must be ${IV_BYTES} bytes`);
  if (tag.length !== TAG_BYTES) throw new EnvelopeError('MalformedEnvelope', `enc.tag must be ${TAG_BYTES} bytes`);
  let plaintext: Buffer;
  try {
    const aesKey = privateDecrypt(
      { key: privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' },
      wrapped,
    );
    if (aesKey.length !== AES_KEY_BYTES) throw new Error('wrong key length');
    const decipher = createDecipheriv('aes-256-gcm', aesKey, iv);
    decipher.setAuthTag(tag);
    plaintext = Buffer.concat([decipher.update(ct), decipher.final()]);
  } catch {
    // One answer for every cryptographic failure: no oracle about which step failed.
    throw new EnvelopeError(
      'DecryptionFailed',
      'the envelope could not be decrypted: wrap the AES-256-GCM key with RSA-OAEP-SHA256 to the server key from code 103',
    );
  }
  try {
    return JSON.parse(plaintext.toString('utf8'));
  } catch {
    throw new EnvelopeError('InvalidJson', 'the decrypted body is not JSON');
  }
}
