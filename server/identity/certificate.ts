import { createHash, X509Certificate } from 'node:crypto';

/** Error of the identity layer; `code` uses the domain's vocabulary so the API maps it to a status. */
export class IdentityError extends Error {
  override readonly name = 'IdentityError';
  constructor(
    readonly code: 'invalid' | 'not_found' | 'conflict',
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
  }
}

/** SHA-256 of a certificate's DER, lowercase hex without separators: the identity key everywhere. */
export function fingerprintOfDer(der: Uint8Array): string {
  return createHash('sha256').update(der).digest('hex');
}

/** What the identity tables store about a certificate. */
export interface ParsedCertificate {
  x509: X509Certificate;
  pem: string;
  fingerprint: string;
  subject: string;
  issuer: string;
  commonName: string | null;
  serialNumber: string;
  notBefore: Date;
  notAfter: Date;
  isCa: boolean;
}

const PEM_BLOCK = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/** Parses exactly one PEM certificate (RSA or EC); throws `invalid` with a hint otherwise. */
export function parseCertificatePem(pem: string, what = 'certificate'): ParsedCertificate {
  const blocks = typeof pem === 'string' ? (pem.match(PEM_BLOCK) ?? []) : [];
  if (blocks.length !== 1) {
    throw new IdentityError(
      'invalid',
      `${what} must be exactly one PEM certificate ("-----BEGIN CERTIFICATE-----"); got ${blocks.length}`,
    );
  }
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(blocks[0]!);
  } catch (err) {
    throw new IdentityError('invalid', `${what} is not a readable X.509 certificate: ${(err as Error).message}`);
  }
  return describe(x509);
}

/** Parses a DER certificate (as found in `tls.PeerCertificate.raw`). */
export function parseCertificateDer(der: Buffer): ParsedCertificate {
  return describe(new X509Certificate(der));
}

function describe(x509: X509Certificate): ParsedCertificate {
  return {
    x509,
    pem: x509.toString(),
    fingerprint: fingerprintOfDer(x509.raw),
    subject: oneLine(x509.subject),
    issuer: oneLine(x509.issuer),
    commonName: commonNameOf(x509),
    serialNumber: x509.serialNumber.toLowerCase(),
    notBefore: new Date(x509.validFrom),
    notAfter: new Date(x509.validTo),
    isCa: x509.ca,
  };
}

/** `CN=a\nO=b` → `CN=a, O=b` (Node prints one attribute per line). */
function oneLine(name: string): string {
  return name.split('\n').filter(Boolean).join(', ');
}

function commonNameOf(x509: X509Certificate): string | null {
  const cn = x509.toLegacyObject().subject?.CN as string | string[] | undefined;
  const value = Array.isArray(cn) ? cn[0] : cn;
  return value && value.length > 0 ? value : null;
}
