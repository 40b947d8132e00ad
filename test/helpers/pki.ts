import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import forge from 'node-forge';
import {
  createSelfSignedCa,
  initDevPki,
  issueDeviceCertificate,
  type CertifiedKey,
  type PkiMaterial,
} from '../../certs/pki.ts';

export type { CertifiedKey, PkiMaterial };

let memo: Promise<PkiMaterial> | undefined;

/**
 * One development PKI per test process, in a temp dir removed at exit: root CA, signer CA
 * (register `material.signerCa.certPem` as a signer CA) and a server certificate for
 * localhost / 127.0.0.1 / ::1 (clients trust `material.rootCa.certPem`).
 */
export function getTestPki(): Promise<PkiMaterial> {
  if (!memo) {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-pki-'));
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
    memo = initDevPki(dir).then((r) => r.material);
  }
  return memo;
}

let sharedKey: string | undefined;

/** One RSA key reused by test device certificates: key generation dominates otherwise. */
function testKeyPem(): string {
  sharedKey ??= forge.pki.privateKeyToPem(forge.pki.rsa.generateKeyPair({ bits: 2048 }).privateKey);
  return sharedKey;
}

/** A device certificate signed by the test signer CA, CN = serial. */
export async function deviceCert(
  serial: string,
  opts: { notBefore?: Date; notAfter?: Date } = {},
): Promise<CertifiedKey> {
  return issueDeviceCertificate(await getTestPki(), serial, { ...opts, keyPem: testKeyPem() });
}

/** A CA unrelated to the test PKI (self-signed, usable as a signer CA). */
export function otherCa(name = 'unrelated test CA'): CertifiedKey {
  return createSelfSignedCa(name);
}

/** A device certificate (CN = serial) signed by `ca` instead of the test signer CA. */
export async function deviceCertFromCa(ca: CertifiedKey, serial: string): Promise<CertifiedKey> {
  return issueDeviceCertificate(await getTestPki(), serial, { issuer: ca, keyPem: testKeyPem() });
}

/** A self-signed client certificate with CN = serial (not a CA). */
export function selfSignedCert(serial: string): CertifiedKey {
  const key = forge.pki.privateKeyFromPem(testKeyPem()) as forge.pki.rsa.PrivateKey;
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.setRsaPublicKey(key.n, key.e);
  cert.serialNumber = `0${forge.util.bytesToHex(forge.random.getBytesSync(15))}`;
  cert.validity.notBefore = new Date(Date.now() - 3600_000);
  cert.validity.notAfter = new Date(Date.now() + 365 * 24 * 3600_000);
  const subject = [{ name: 'commonName', value: serial }];
  cert.setSubject(subject);
  cert.setIssuer(subject);
  cert.setExtensions([{ name: 'extKeyUsage', clientAuth: true }]);
  cert.sign(key, forge.md.sha256.create());
  return { certPem: forge.pki.certificateToPem(cert), keyPem: testKeyPem() };
}

/** A device certificate from the test signer CA that expired yesterday. */
export async function expiredDeviceCert(serial: string): Promise<CertifiedKey> {
  const day = 24 * 3600_000;
  return deviceCert(serial, { notBefore: new Date(Date.now() - 30 * day), notAfter: new Date(Date.now() - day) });
}

/** TLS options for a device client: its certificate and key, trusting the test root CA. */
export async function deviceTlsOptions(cred?: CertifiedKey): Promise<{ ca: string; cert?: string; key?: string }> {
  const pki = await getTestPki();
  return cred ? { ca: pki.rootCa.certPem, cert: cred.certPem, key: cred.keyPem } : { ca: pki.rootCa.certPem };
}

/**
 * A certificate signed by the test signer CA that says it is a CA itself (basicConstraints
 * CA:TRUE), with the clientAuth usage a device certificate has: TLS accepts it as a client.
 */
export async function caLeafCert(serial: string): Promise<CertifiedKey> {
  const pki = await getTestPki();
  const key = forge.pki.privateKeyFromPem(testKeyPem()) as forge.pki.rsa.PrivateKey;
  const signer = forge.pki.certificateFromPem(pki.signerCa.certPem);
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.setRsaPublicKey(key.n, key.e);
  cert.serialNumber = `0${forge.util.bytesToHex(forge.random.getBytesSync(15))}`;
  cert.validity.notBefore = new Date(Date.now() - 3600_000);
  cert.validity.notAfter = new Date(Date.now() + 365 * 24 * 3600_000);
  cert.setSubject([{ name: 'commonName', value: serial }]);
  cert.setIssuer(signer.subject.attributes);
  cert.setExtensions([
    { name: 'basicConstraints', cA: true, critical: true },
    { name: 'keyUsage', digitalSignature: true, keyCertSign: true, critical: true },
    { name: 'extKeyUsage', clientAuth: true },
    { name: 'authorityKeyIdentifier', keyIdentifier: signer.generateSubjectKeyIdentifier().getBytes() },
  ]);
  cert.sign(forge.pki.privateKeyFromPem(pki.signerCa.keyPem) as forge.pki.rsa.PrivateKey, forge.md.sha256.create());
  return { certPem: forge.pki.certificateToPem(cert), keyPem: testKeyPem() };
}
