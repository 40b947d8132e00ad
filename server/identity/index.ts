/**
 * Certificate → device mapping: signer CAs (just-in-time registration), registered device
 * certificates, revocation, and the CA list the mutual-TLS device listener trusts.
 */
export { IdentityError, fingerprintOfDer, parseCertificatePem, type ParsedCertificate } from './certificate.ts';
export {
  addSignerCa,
  listSignerCas,
  removeSignerCa,
  trustedCaPems,
  onSignerCasChanged,
  notifySignerCasChanged,
  type AddSignerCaInput,
  type SignerCaRecord,
} from './signer-cas.ts';
export {
  addDeviceCertificate,
  listDeviceCertificates,
  revokeDeviceCertificate,
  type DeviceCertificateRecord,
} from './device-certificates.ts';
export { resolveDeviceIdentity, type DeviceIdentity, type IdentityResult, type ResolveOptions } from './resolve.ts';
