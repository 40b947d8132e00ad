/**
 * Device certificates for tens of thousands of bench devices, fast: one certificate is built
 * with the dev PKI (node-forge), then each device's copy only differs in serial number and CN
 * (fixed width, so every length in the DER stays the same) and is signed natively.
 * All devices share one RSA key; the fingerprint is of the certificate, so devices stay distinct.
 * Slices are cached on disk next to the PKI, so later runs pay nothing.
 *
 * The server process and every worker call this at once on a fresh PKI: the key and each slice
 * are published with a no-overwrite link, and a process that loses the race uses the winner's
 * file, so every process holds the same key and the same certificates (before, each process
 * generated its own key and 1,002 of 10,000 devices failed with "key values mismatch").
 */
import { createHash, createPrivateKey, randomBytes, sign, type KeyObject } from 'node:crypto';
import { existsSync, linkSync, mkdirSync, readFileSync, unlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import forge from 'node-forge';
import { issueDeviceCertificate, loadPki, type PkiMaterial } from '../../certs/pki.ts';

const CN_WIDTH = 8;
const CN_PREFIX = 'bench-';
const TEMPLATE_CN = `${CN_PREFIX}${'0'.repeat(CN_WIDTH)}`;

/** The CN (device identifier) of bench device `index`. */
export function benchSerial(index: number): string {
  return `${CN_PREFIX}${String(index).padStart(CN_WIDTH, '0')}`;
}

/**
 * Writes `content` to `file` unless another process got there first; returns what `file` holds.
 * The content goes to a private temporary file that is then hard-linked into place, which fails
 * when `file` exists: readers never see a torn file and nobody overwrites a published one.
 */
function publishOnce(file: string, content: string, mode = 0o644): string {
  if (existsSync(file)) return readFileSync(file, 'utf8');
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, content, { mode });
  try {
    linkSync(tmp, file);
    return content;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    return readFileSync(file, 'utf8');
  } finally {
    unlinkSync(tmp);
  }
}

/** One RSA key for every bench device certificate, created once next to the PKI. */
export function benchDeviceKey(pkiDir: string): string {
  const file = path.join(pkiDir, 'bench-device.key');
  if (existsSync(file)) return readFileSync(file, 'utf8');
  const pem = forge.pki.privateKeyToPem(forge.pki.rsa.generateKeyPair({ bits: 2048, e: 0x10001 }).privateKey);
  return publishOnce(file, pem, 0o600);
}

interface Template {
  tbs: Buffer;
  cnOffset: number;
  serialOffset: number;
  serialLength: number;
  signerKey: KeyObject;
  /** DER of AlgorithmIdentifier sha256WithRSAEncryption. */
  algorithm: Buffer;
}

function derLength(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  const bytes: number[] = [];
  for (let v = n; v > 0; v >>= 8) bytes.unshift(v & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

function tlv(tag: number, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([tag]), derLength(body.length), body]);
}

function buildTemplate(pki: PkiMaterial, keyPem: string): Template {
  const pem = issueDeviceCertificate(pki, TEMPLATE_CN, { keyPem }).certPem;
  const cert = forge.pki.certificateFromPem(pem);
  const tbs = Buffer.from(
    forge.asn1
      .toDer(
        (forge.pki as unknown as { getTBSCertificate(c: forge.pki.Certificate): forge.asn1.Asn1 }).getTBSCertificate(
          cert,
        ),
      )
      .getBytes(),
    'binary',
  );
  const cnOffset = tbs.indexOf(Buffer.from(TEMPLATE_CN, 'ascii'));
  const serial = Buffer.from(cert.serialNumber, 'hex');
  const serialOffset = tbs.indexOf(serial);
  if (cnOffset < 0 || serialOffset < 0)
    throw new Error('BENCH_CERT_TEMPLATE: could not locate serial/CN in the template certificate');
  // AlgorithmIdentifier { sha256WithRSAEncryption, NULL }
  const algorithm = Buffer.from('300d06092a864886f70d01010b0500', 'hex');
  return {
    tbs,
    cnOffset,
    serialOffset,
    serialLength: serial.length,
    signerKey: createPrivateKey(pki.signerCa.keyPem),
    algorithm,
  };
}

function issueFromTemplate(t: Template, index: number, salt: Buffer): string {
  const tbs = Buffer.from(t.tbs);
  tbs.write(benchSerial(index), t.cnOffset, 'ascii');
  // Serial: 0x01 (positive), then a per-cache salt and the index: unique per issuer.
  const serial = Buffer.alloc(t.serialLength);
  serial[0] = 0x01;
  salt.copy(serial, 1, 0, t.serialLength - 5);
  serial.writeUInt32BE(index, t.serialLength - 4);
  serial.copy(tbs, t.serialOffset);
  const signature = sign('sha256', tbs, t.signerKey);
  const der = tlv(0x30, Buffer.concat([tbs, t.algorithm, tlv(0x03, Buffer.concat([Buffer.from([0]), signature]))]));
  const b64 = der.toString('base64').replace(/.{64}/g, '$&\n');
  return `-----BEGIN CERTIFICATE-----\n${b64}\n-----END CERTIFICATE-----\n`;
}

export interface DeviceCredentials {
  keyPem: string;
  /** Root CA the server certificate chains to. */
  caPem: string;
  certs: Map<number, string>;
}

const SLICE = 1000;

/** Certificates of devices [from, to), from the cache under `<pkiDir>/bench-certs` or issued now. */
export function deviceCredentials(pkiDir: string, from: number, to: number): DeviceCredentials {
  const pki = loadPki(pkiDir);
  const keyPem = benchDeviceKey(pkiDir);
  // The cache is only valid for this signer CA and this device key.
  const signerTag = createHash('sha256').update(pki.signerCa.certPem).update(keyPem).digest('hex').slice(0, 12);
  const dir = path.join(pkiDir, `bench-certs-${signerTag}`);
  mkdirSync(dir, { recursive: true });
  let template: Template | undefined;
  const certs = new Map<number, string>();
  for (let start = Math.floor(from / SLICE) * SLICE; start < to; start += SLICE) {
    const file = path.join(dir, `${start}.json`);
    let slice: string[];
    if (existsSync(file)) {
      slice = JSON.parse(readFileSync(file, 'utf8')) as string[];
    } else {
      template ??= buildTemplate(pki, keyPem);
      const salt = randomBytes(16);
      slice = [];
      for (let i = start; i < start + SLICE; i++) slice.push(issueFromTemplate(template, i, salt));
      slice = JSON.parse(publishOnce(file, JSON.stringify(slice))) as string[];
    }
    for (let i = Math.max(from, start); i < Math.min(to, start + SLICE); i++) certs.set(i, slice[i - start]!);
  }
  return { keyPem, caPem: pki.rootCa.certPem, certs };
}
