import { createPublicKey, verify } from 'node:crypto';

/**
 * Checks a detached ed25519 firmware signature: the signed message is the image's raw 32-byte
 * SHA-256 digest (the server's convention, so neither side holds the image in memory).
 * True when any of `trustedKeyPems` verifies it.
 */
export function firmwareSignatureValid(
  sha256: string,
  signatureBase64: string,
  trustedKeyPems: readonly string[],
): boolean {
  const signature = Buffer.from(signatureBase64.trim(), 'base64');
  if (signature.length !== 64 || !/^[0-9a-f]{64}$/i.test(sha256)) return false;
  const digest = Buffer.from(sha256, 'hex');
  return trustedKeyPems.some((pem) => {
    try {
      return verify(null, digest, createPublicKey(pem), signature);
    } catch {
      return false;
    }
  });
}
