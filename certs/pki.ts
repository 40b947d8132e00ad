import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import forge from 'node-forge';

/**
 * Development PKI: a root CA, a device-signer CA (signed by the root) that issues device
 * certificates, and a server certificate (signed by the root) for the device listener.
 * Devices trust the root (`ca.pem`); the server trusts the signer CA once it is registered.
 */

/** A certificate and its private key, both PEM. */
export interface CertifiedKey {
  certPem: string;
  keyPem: string;
}

export interface PkiMaterial {
  /** Directory the material was loaded from. */
  dir: string;
  rootCa: CertifiedKey;
  signerCa: CertifiedKey;
  server: CertifiedKey;
}

export interface InitDevPkiOptions {
  /** DNS names and IP addresses of the server certificate (default localhost, 127.0.0.1, ::1). */
  hosts?: string[];
}

export interface IssueDeviceOptions {
  notBefore?: Date;
  notAfter?: Date;
  /** The CA that signs: the dev signer CA (default) or any other CA certificate and key. */
  issuer?: 'signer' | CertifiedKey;
  /** Reuse this RSA private key (PEM) instead of generating one; tests use it to save time. */
  keyPem?: string;
}

export class PkiError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'PkiError';
  }
}

/** File names inside a PKI directory. */
export const PKI_FILES = {
  rootCert: 'root-ca.pem',
  rootKey: 'root-ca.key',
  signerCert: 'signer-ca.pem',
  signerKey: 'signer-ca.key',
  serverCert: 'server.pem',
  serverKey: 'server.key',
} as const;

export const DEFAULT_SERVER_HOSTS = ['localhost', '127.0.0.1', '::1'];

const HOUR_MS = 3600_000;
const YEAR_MS = 365 * 24 * HOUR_MS;
const ORGANIZATION = 'fleethub development';

/**
 * Creates whatever is missing of the development PKI in `dir` and loads it. Idempotent: an
 * existing key is never overwritten (files are created exclusively); a certificate whose key
 * exists is re-issued for that key. Returns the paths it created.
 */
export async function initDevPki(
  dir: string,
  opts: InitDevPkiOptions = {},
): Promise<{ created: string[]; material: PkiMaterial }> {
  mkdirSync(dir, { recursive: true });
  const created: string[] = [];
  const hosts = opts.hosts && opts.hosts.length > 0 ? opts.hosts : DEFAULT_SERVER_HOSTS;

  const rootKeyExisted = existsSync(path.join(dir, PKI_FILES.rootKey));
  const dependents = [PKI_FILES.signerCert, PKI_FILES.serverCert].filter((f) => existsSync(path.join(dir, f)));
  if (!rootKeyExisted && dependents.length > 0) {
    throw new PkiError(
      'PKI_ROOT_KEY_MISSING',
      `${path.join(dir, PKI_FILES.rootKey)} is missing but ${dependents.join(', ')} exist(s); restore the root key or move the directory away and run "fleethub certs init" again`,
    );
  }

  const root = ensureCertifiedKey(dir, PKI_FILES.rootCert, PKI_FILES.rootKey, created, (key) =>
    buildCertificate({
      subjectCn: 'fleethub development root CA',
      publicKey: key.publicKey,
      signer: { key: key.privateKey },
      ca: { pathLen: 1 },
      notAfter: new Date(Date.now() + 20 * YEAR_MS),
    }),
  );
  const rootSigner = {
    cert: forge.pki.certificateFromPem(root.certPem),
    key: forge.pki.privateKeyFromPem(root.keyPem),
  };

  const signer = ensureCertifiedKey(dir, PKI_FILES.signerCert, PKI_FILES.signerKey, created, (key) =>
    buildCertificate({
      subjectCn: 'fleethub development device signer CA',
      publicKey: key.publicKey,
      signer: rootSigner,
      ca: { pathLen: 0 },
      notAfter: new Date(Date.now() + 10 * YEAR_MS),
    }),
  );

  const server = ensureCertifiedKey(dir, PKI_FILES.serverCert, PKI_FILES.serverKey, created, (key) =>
    buildCertificate({
      subjectCn: hosts[0]!,
      publicKey: key.publicKey,
      signer: rootSigner,
      server: { hosts },
      notAfter: new Date(Date.now() + 2 * YEAR_MS),
    }),
  );

  return { created, material: { dir, rootCa: root, signerCa: signer, server } };
}

/** Loads a PKI directory created by `initDevPki`; throws PKI_NOT_INITIALISED when files are missing. */
export function loadPki(dir: string): PkiMaterial {
  const read = (name: string): string => {
    const file = path.join(dir, name);
    if (!existsSync(file)) {
      throw new PkiError('PKI_NOT_INITIALISED', `${file} does not exist; run "fleethub certs init --dir ${dir}" first`);
    }
    return readFileSync(file, 'utf8');
  };
  return {
    dir,
    rootCa: { certPem: read(PKI_FILES.rootCert), keyPem: read(PKI_FILES.rootKey) },
    signerCa: { certPem: read(PKI_FILES.signerCert), keyPem: read(PKI_FILES.signerKey) },
    server: { certPem: read(PKI_FILES.serverCert), keyPem: read(PKI_FILES.serverKey) },
  };
}

/**
 * Production mode: the server's own certificate and key only (`server.pem`, the chain in PEM,
 * and `server.key`), which the operator provides; nothing is created. Device trust comes from
 * the signer CAs registered through the API, so no CA key belongs on the server.
 */
export function loadServerCertificate(dir: string): { dir: string; server: { certPem: string; keyPem: string } } {
  const missing = [PKI_FILES.serverCert, PKI_FILES.serverKey].filter((f) => !existsSync(path.join(dir, f)));
  if (missing.length > 0)
    throw new PkiError(
      'PKI_PRODUCTION_MISSING',
      `production mode: ${missing.map((f) => path.join(dir, f)).join(' and ')} missing. Put the server's certificate ` +
        `(PEM, with its intermediate CAs) in ${PKI_FILES.serverCert} and its private key in ${PKI_FILES.serverKey} ` +
        `in ${dir} (--certs-dir / FLEETHUB_CERTS_DIR), and register your device signer CAs through the API; ` +
        'production mode never creates a development PKI (run without --production for a lab)',
    );
  return {
    dir,
    server: {
      certPem: readFileSync(path.join(dir, PKI_FILES.serverCert), 'utf8'),
      keyPem: readFileSync(path.join(dir, PKI_FILES.serverKey), 'utf8'),
    },
  };
}

/** Issues a client certificate with CN = serial, signed by the dev signer CA unless `issuer` says otherwise. */
export function issueDeviceCertificate(
  material: PkiMaterial,
  serial: string,
  opts: IssueDeviceOptions = {},
): CertifiedKey {
  if (!serial || /[\u0000-\u001f]/.test(serial)) {
    throw new PkiError(
      'PKI_BAD_SERIAL',
      `device serial ${JSON.stringify(serial)} must be a non-empty printable string`,
    );
  }
  const issuer = opts.issuer === undefined || opts.issuer === 'signer' ? material.signerCa : opts.issuer;
  const key = opts.keyPem ? keyPairFromPem(opts.keyPem) : generateRsaKey();
  const notBefore = opts.notBefore ?? new Date(Date.now() - HOUR_MS);
  const cert = buildCertificate({
    subjectCn: serial,
    publicKey: key.publicKey,
    signer: { cert: forge.pki.certificateFromPem(issuer.certPem), key: forge.pki.privateKeyFromPem(issuer.keyPem) },
    client: true,
    notBefore,
    notAfter: opts.notAfter ?? new Date(notBefore.getTime() + 10 * YEAR_MS),
  });
  return { certPem: forge.pki.certificateToPem(cert), keyPem: forge.pki.privateKeyToPem(key.privateKey) };
}

/**
 * Writes a device's credentials to `outDir`: `cert.pem`, `key.pem` (0600) and `ca.pem`, the root
 * CA that signed the server certificate, so the device can verify the server. Refuses to
 * overwrite an existing key.
 */
export function writeDeviceCredentials(
  material: PkiMaterial,
  serial: string,
  outDir: string,
): { certPath: string; keyPath: string; caPath: string } {
  mkdirSync(outDir, { recursive: true });
  const keyPath = path.join(outDir, 'key.pem');
  if (existsSync(keyPath)) {
    throw new PkiError(
      'PKI_KEY_EXISTS',
      `${keyPath} already exists; choose another --out directory or remove it first`,
    );
  }
  const device = issueDeviceCertificate(material, serial);
  const certPath = path.join(outDir, 'cert.pem');
  const caPath = path.join(outDir, 'ca.pem');
  writeExclusive(keyPath, device.keyPem, 0o600);
  writeFileSync(certPath, device.certPem);
  writeFileSync(caPath, material.rootCa.certPem);
  return { certPath, keyPath, caPath };
}

/** A self-signed CA certificate and key unrelated to any PKI directory (tests, placeholders). */
export function createSelfSignedCa(commonName: string, opts: { notAfter?: Date } = {}): CertifiedKey {
  const key = generateRsaKey();
  const cert = buildCertificate({
    subjectCn: commonName,
    publicKey: key.publicKey,
    signer: { key: key.privateKey },
    ca: { pathLen: 0 },
    notAfter: opts.notAfter ?? new Date(Date.now() + YEAR_MS),
  });
  return { certPem: forge.pki.certificateToPem(cert), keyPem: forge.pki.privateKeyToPem(key.privateKey) };
}

/** SHA-256 fingerprint of a PEM certificate's DER, lowercase hex without separators. */
export function fingerprintOfPem(pem: string): string {
  const der = forge.asn1.toDer(forge.pki.certificateToAsn1(forge.pki.certificateFromPem(pem))).getBytes();
  return forge.md.sha256.create().update(der).digest().toHex();
}

// --- internals -------------------------------------------------------------------------

function generateRsaKey(): forge.pki.rsa.KeyPair {
  // forge delegates to Node's native generateKeyPairSync when it is available (~0.2 s).
  return forge.pki.rsa.generateKeyPair({ bits: 2048, e: 0x10001 });
}

function keyPairFromPem(keyPem: string): forge.pki.rsa.KeyPair {
  const privateKey = forge.pki.privateKeyFromPem(keyPem);
  return { privateKey, publicKey: forge.pki.setRsaPublicKey(privateKey.n, privateKey.e) };
}

/** Loads cert+key from disk, creating the key (exclusively) and/or the certificate when absent. */
function ensureCertifiedKey(
  dir: string,
  certName: string,
  keyName: string,
  created: string[],
  build: (key: forge.pki.rsa.KeyPair) => forge.pki.Certificate,
): CertifiedKey {
  const certPath = path.join(dir, certName);
  const keyPath = path.join(dir, keyName);
  const hasKey = existsSync(keyPath);
  const hasCert = existsSync(certPath);
  if (hasKey && hasCert) return { certPem: readFileSync(certPath, 'utf8'), keyPem: readFileSync(keyPath, 'utf8') };
  if (!hasKey && hasCert) {
    throw new PkiError(
      'PKI_KEY_MISSING',
      `${certPath} exists without its key ${keyPath}; restore the key or remove the certificate`,
    );
  }
  let key: forge.pki.rsa.KeyPair;
  let keyPem: string;
  if (hasKey) {
    keyPem = readFileSync(keyPath, 'utf8');
    key = keyPairFromPem(keyPem);
  } else {
    key = generateRsaKey();
    keyPem = forge.pki.privateKeyToPem(key.privateKey);
    writeExclusive(keyPath, keyPem, 0o600);
    created.push(keyPath);
  }
  const certPem = forge.pki.certificateToPem(build(key));
  writeExclusive(certPath, certPem, 0o644);
  created.push(certPath);
  return { certPem, keyPem };
}

/** Creates a file that must not exist yet ('wx'), so a concurrent run cannot clobber a key. */
function writeExclusive(file: string, content: string, mode: number): void {
  try {
    writeFileSync(file, content, { flag: 'wx', mode });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new PkiError(
        'PKI_FILE_EXISTS',
        `${file} appeared while it was being created (another "certs init" running?); run again`,
      );
    }
    throw err;
  }
  chmodSync(file, mode); // the umask may have narrowed or widened nothing; make it exact
}

interface BuildCertificate {
  subjectCn: string;
  publicKey: forge.pki.PublicKey;
  /** Self-signed when `cert` is absent. */
  signer: { cert?: forge.pki.Certificate; key: forge.pki.PrivateKey };
  ca?: { pathLen: number };
  server?: { hosts: string[] };
  client?: boolean;
  notBefore?: Date;
  notAfter: Date;
}

function buildCertificate(spec: BuildCertificate): forge.pki.Certificate {
  const cert = forge.pki.createCertificate();
  cert.publicKey = spec.publicKey;
  cert.serialNumber = randomSerial();
  cert.validity.notBefore = spec.notBefore ?? new Date(Date.now() - HOUR_MS); // tolerate clock skew
  cert.validity.notAfter = spec.notAfter;
  const subject = [
    { name: 'commonName', value: spec.subjectCn },
    { name: 'organizationName', value: ORGANIZATION },
  ];
  cert.setSubject(subject);
  cert.setIssuer(spec.signer.cert ? spec.signer.cert.subject.attributes : subject);

  const extensions: Record<string, unknown>[] = [];
  if (spec.ca) {
    extensions.push({ name: 'basicConstraints', cA: true, pathLenConstraint: spec.ca.pathLen, critical: true });
    extensions.push({ name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true });
  } else {
    extensions.push({ name: 'basicConstraints', cA: false, critical: true });
    extensions.push({ name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true });
    extensions.push({ name: 'extKeyUsage', serverAuth: !!spec.server, clientAuth: !!spec.client });
  }
  if (spec.server) {
    extensions.push({
      name: 'subjectAltName',
      altNames: spec.server.hosts.map((h) => (isIP(h) ? { type: 7, ip: h } : { type: 2, value: h })),
    });
  }
  extensions.push({ name: 'subjectKeyIdentifier' });
  if (spec.signer.cert) {
    const ski = spec.signer.cert.generateSubjectKeyIdentifier().getBytes();
    extensions.push({ name: 'authorityKeyIdentifier', keyIdentifier: ski });
  }
  cert.setExtensions(extensions);
  cert.sign(spec.signer.key as forge.pki.rsa.PrivateKey, forge.md.sha256.create());
  return cert;
}

/** A positive 128-bit serial number in hex (high bit clear so DER needs no sign byte). */
function randomSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = bytes[0]! & 0x7f;
  if (bytes[0] === 0) bytes[0] = 0x01;
  return bytes.toString('hex');
}
