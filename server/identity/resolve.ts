import { X509Certificate } from 'node:crypto';
import type { DetailedPeerCertificate, PeerCertificate } from 'node:tls';
import { sql } from 'kysely';
import { audit, SYSTEM } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { DeviceProtocol, SignerCa } from '../db/schema.ts';
import { fingerprintOfDer, parseCertificateDer } from './certificate.ts';
import { inTransaction } from './signer-cas.ts';

/** Who is on the other end of a mutual-TLS connection. */
export interface DeviceIdentity {
  deviceId: string;
  orgId: string;
  productId: string;
  /** The device's serial (certificate CN for devices registered just in time). */
  identifier: string;
  certificateId: string;
  /** SHA-256 of the presented certificate's DER, lowercase hex. */
  fingerprint: string;
  /** The protocol the device is registered to (an identity belongs to one protocol). */
  protocol: DeviceProtocol;
  /** End of the certificate's validity: a live connection is closed then. */
  notAfter: Date;
  /**
   * The node the device is recorded online on when it authenticated (null: offline): a Phoenix
   * connect tells that node alone to close the connection it replaces.
   */
  connectedNode: string | null;
}

export type IdentityResult =
  | { ok: true; identity: DeviceIdentity; created: boolean }
  | { ok: false; status: 401 | 403; reason: string };

export interface ResolveOptions {
  /** Protocol recorded on devices registered just in time (default 'phoenix'). */
  protocol?: DeviceProtocol;
  /**
   * The peer's issuer chain, asked for only when the certificate is not registered (building it
   * costs more than the lookup of a known certificate); default: the chain `peer` carries.
   */
  detailedPeer?: () => DetailedPeerCertificate;
}

// last_used_at is bookkeeping, not an audit trail: one write per certificate per minute is plenty.
const LAST_USED_RESOLUTION = sql<Date>`now() - interval '1 minute'`;

/**
 * Maps a client certificate to its device. A registered certificate (by SHA-256 of its DER)
 * maps to its device; an unknown one signed by a registered signer CA registers the device
 * just in time in that CA's org and product (identifier = CN), once even under concurrent
 * first connects. Revoked, expired or not yet valid certificates, CA certificates and revoked
 * devices answer 403, no certificate 401.
 * The caller has already rejected certificates that failed TLS verification.
 */
export async function resolveDeviceIdentity(
  db: Db,
  peer: PeerCertificate | DetailedPeerCertificate | null | undefined,
  opts: ResolveOptions = {},
): Promise<IdentityResult> {
  if (!peer?.raw || peer.raw.length === 0) {
    return { ok: false, status: 401, reason: 'no client certificate presented' };
  }
  // A CA certificate identifies a signer, not a device: it could mint device identities of its own.
  if (peer.ca) return { ok: false, status: 403, reason: CA_LEAF_REASON };
  const fingerprint = fingerprintOfDer(peer.raw);

  const known = await findAndTouchByFingerprint(db, fingerprint);
  if (known) return refusal(known) ?? { ok: true, identity: identityOf(known, fingerprint), created: false };

  const signer = await findSignerCa(db, opts.detailedPeer?.() ?? peer);
  if (!signer.ok) return signer;
  return registerJustInTime(db, peer, fingerprint, signer.ca, opts.protocol ?? 'phoenix');
}

const CA_LEAF_REASON =
  'the client certificate is a CA certificate (basicConstraints CA:TRUE); a device identity needs an end-entity certificate (CA:FALSE) issued by the signer CA';

interface KnownCertificate {
  certificate_id: string;
  revoked_at: Date | null;
  not_before: Date;
  not_after: Date;
  device_id: string;
  org_id: string;
  product_id: string;
  identifier: string;
  approval: string;
  protocol: DeviceProtocol;
  connection_status: string;
  connected_node: string | null;
}

/**
 * `findByFingerprint`, and in the same statement (every connect runs it) the `last_used_at`
 * touch of a certificate that will be accepted.
 */
async function findAndTouchByFingerprint(db: Db, fingerprint: string): Promise<KnownCertificate | undefined> {
  return db
    .with('known', () => knownCertificateQuery(db, fingerprint))
    .with('touch', (qb) =>
      qb
        .updateTable('device_certificates')
        .set({ last_used_at: sql<Date>`now()` })
        .where('id', 'in', (eb) =>
          eb
            .selectFrom('known')
            .select('certificate_id')
            .where('revoked_at', 'is', null)
            .where('approval', '<>', 'revoked')
            .where('not_before', '<=', sql<Date>`now()`)
            .where('not_after', '>', sql<Date>`now()`),
        )
        .where((eb) => eb.or([eb('last_used_at', 'is', null), eb('last_used_at', '<', LAST_USED_RESOLUTION)]))
        .returning('id'),
    )
    .selectFrom('known')
    .selectAll()
    .executeTakeFirst();
}

async function findByFingerprint(db: Db, fingerprint: string): Promise<KnownCertificate | undefined> {
  return knownCertificateQuery(db, fingerprint).executeTakeFirst();
}

function knownCertificateQuery(db: Db, fingerprint: string) {
  return db
    .selectFrom('device_certificates')
    .innerJoin('devices', 'devices.id', 'device_certificates.device_id')
    .select([
      'device_certificates.id as certificate_id',
      'device_certificates.revoked_at',
      'device_certificates.not_before',
      'device_certificates.not_after',
      'devices.id as device_id',
      'devices.org_id',
      'devices.product_id',
      'devices.identifier',
      'devices.approval',
      'devices.protocol',
      'devices.connection_status',
      'devices.connected_node',
    ])
    .where('device_certificates.fingerprint_sha256', '=', fingerprint);
}

/**
 * Why a registered certificate is refused now. The validity window is checked here too: a
 * resumed TLS session is not re-verified by OpenSSL, and must not outlive its certificate.
 */
function refusal(known: KnownCertificate, now = Date.now()): IdentityResult | undefined {
  if (known.revoked_at) return { ok: false, status: 403, reason: `certificate ${known.certificate_id} was revoked` };
  if (known.not_after.getTime() <= now)
    return {
      ok: false,
      status: 403,
      reason: `client certificate has expired (not after ${known.not_after.toISOString()})`,
    };
  if (known.not_before.getTime() > now)
    return {
      ok: false,
      status: 403,
      reason: `client certificate is not valid yet (not before ${known.not_before.toISOString()}); check the device clock`,
    };
  if (known.approval === 'revoked') return { ok: false, status: 403, reason: `device ${known.device_id} is revoked` };
  return undefined;
}

function identityOf(known: KnownCertificate, fingerprint: string): DeviceIdentity {
  return {
    deviceId: known.device_id,
    orgId: known.org_id,
    productId: known.product_id,
    identifier: known.identifier,
    certificateId: known.certificate_id,
    fingerprint,
    protocol: known.protocol,
    notAfter: known.not_after,
    connectedNode: known.connection_status === 'online' ? known.connected_node : null,
  };
}

/** The issuers above the peer's certificate, nearest first, as Node built the chain (at most 8). */
export function issuerChain(peer: PeerCertificate | DetailedPeerCertificate): X509Certificate[] {
  const chain: X509Certificate[] = [];
  let link: DetailedPeerCertificate | undefined = 'issuerCertificate' in peer ? peer.issuerCertificate : undefined;
  let child: Buffer = peer.raw;
  // Node ends the chain with a self-signed certificate whose issuerCertificate is itself.
  while (link?.raw && link.raw.length > 0 && !link.raw.equals(child) && chain.length < 8) {
    chain.push(new X509Certificate(link.raw));
    child = link.raw;
    link = link.issuerCertificate;
  }
  return chain;
}

type SignerCaRow = Pick<SignerCa, 'id' | 'org_id' | 'product_id'>;

/**
 * The nearest registered signer CA in the peer's issuer chain (as Node built it from the
 * handshake and the trust store), after checking each link's signature up to it.
 */
async function findSignerCa(
  db: Db,
  peer: PeerCertificate | DetailedPeerCertificate,
): Promise<{ ok: true; ca: SignerCaRow } | { ok: false; status: 403; reason: string }> {
  const chain = issuerChain(peer);
  const notRegistered = {
    ok: false as const,
    status: 403 as const,
    reason: 'certificate is not registered and no registered signer CA issued it',
  };
  if (chain.length === 0) return notRegistered;

  const fingerprints = chain.map((c) => fingerprintOfDer(c.raw));
  const rows = await db
    .selectFrom('signer_cas')
    .select(['id', 'org_id', 'product_id', 'fingerprint_sha256', 'not_after'])
    .where('fingerprint_sha256', 'in', fingerprints)
    .execute();
  const known = new Set(rows.map((r) => r.fingerprint_sha256));
  const index = fingerprints.findIndex((f) => known.has(f));
  if (index < 0) return notRegistered;
  const row = rows.find((r) => r.fingerprint_sha256 === fingerprints[index])!;
  if (row.not_after.getTime() <= Date.now())
    return { ok: false, status: 403, reason: `signer CA ${row.id} has expired` };

  // Defence in depth: the TLS layer verified the chain, but this function may be called by others.
  let subject = new X509Certificate(peer.raw);
  for (const issuer of chain.slice(0, index + 1)) {
    if (!subject.checkIssued(issuer) || !subject.verify(issuer.publicKey)) {
      return { ok: false, status: 403, reason: 'certificate chain does not verify up to the registered signer CA' };
    }
    subject = issuer;
  }
  return { ok: true, ca: { id: row.id, org_id: row.org_id, product_id: row.product_id } };
}

async function registerJustInTime(
  db: Db,
  peer: PeerCertificate | DetailedPeerCertificate,
  fingerprint: string,
  ca: SignerCaRow,
  protocol: DeviceProtocol,
): Promise<IdentityResult> {
  const cert = parseCertificateDer(peer.raw);
  if (!cert.commonName)
    return { ok: false, status: 403, reason: 'certificate has no subject CN to use as the device serial' };
  const identifier = cert.commonName;

  return inTransaction(db, async (trx) => {
    // ON CONFLICT: concurrent first connects of one device create it once; the loser reads it.
    const inserted = await trx
      .insertInto('devices')
      .values({ org_id: ca.org_id, product_id: ca.product_id, identifier, protocol })
      .onConflict((oc) => oc.columns(['product_id', 'identifier']).doNothing())
      .returning(['id'])
      .executeTakeFirst();
    const device = await trx
      .selectFrom('devices')
      .select(['id', 'org_id', 'product_id', 'identifier', 'approval'])
      .where('product_id', '=', ca.product_id)
      .where('identifier', '=', identifier)
      .executeTakeFirstOrThrow();

    const certRow = await trx
      .insertInto('device_certificates')
      .values({
        device_id: device.id,
        fingerprint_sha256: fingerprint,
        serial: cert.serialNumber,
        subject: cert.subject,
        issuer: cert.issuer,
        not_before: cert.notBefore,
        not_after: cert.notAfter,
        pem: cert.pem,
        last_used_at: new Date(),
      })
      .onConflict((oc) => oc.column('fingerprint_sha256').doNothing())
      .returning(['id'])
      .executeTakeFirst();

    if (inserted) {
      await audit(trx, SYSTEM, {
        orgId: device.org_id,
        action: 'device.registered',
        resourceType: 'device',
        resourceId: device.id,
        details: {
          identifier,
          product_id: device.product_id,
          protocol,
          signer_ca_id: ca.id,
          fingerprint,
          via: 'signer_ca',
        },
      });
    } else if (certRow) {
      // An existing device (created by an operator, or holding another certificate) gains this one.
      await audit(trx, SYSTEM, {
        orgId: device.org_id,
        action: 'device_certificate.added',
        resourceType: 'device',
        resourceId: device.id,
        details: {
          certificate_id: certRow.id,
          fingerprint,
          subject: cert.subject,
          signer_ca_id: ca.id,
          via: 'signer_ca',
        },
      });
    }

    // A concurrent connect may have registered the certificate first: use what is stored.
    const known = await findByFingerprint(trx, fingerprint);
    if (!known) throw new Error(`device certificate ${fingerprint} vanished during registration`);
    const refused = refusal(known);
    if (refused) return refused;
    return { ok: true as const, identity: identityOf(known, fingerprint), created: inserted !== undefined };
  });
}
