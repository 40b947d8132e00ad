/**
 * The one download-URL signer and its typed verdict, without a server: what each field binds, and
 * which verdict each kind of broken URL gets. The routes' use of it is in download-routes.test.ts.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  bucketedExpiry,
  type DownloadGrant,
  signDownload,
  signDownloadUrl,
  verifyDownload,
} from '../../server/firmware/signing.ts';

const secret = 'test secret';
const fw = '0b6c4f0e-5a57-4c63-9d1e-6f3f0c1d2e3a';
const dev = '7d9f2b1c-1e2f-4a3b-8c4d-5e6f7a8b9c0d';
const later = new Date(Date.now() + 3600_000);
const str = (s: { expires: number; sig: string }) => ({ expires: String(s.expires), sig: s.sig });

describe('download URL signing', () => {
  it('accepts what it signed, with the expiry in whole seconds', () => {
    const grant: DownloadGrant = { route: 'wifidogx', firmwareId: fw, deviceId: dev };
    const signed = signDownload(secret, grant, later);
    assert.match(signed.sig, /^[0-9a-f]{64}$/);
    assert.deepEqual(verifyDownload(secret, grant, str(signed)), {
      ok: true,
      expiresAt: new Date(Math.floor(later.getTime() / 1000) * 1000),
    });
  });

  it('binds the route, the firmware, the device, the expiry and the secret', () => {
    const grant: DownloadGrant = { route: 'keyauth', firmwareId: fw, deviceId: dev };
    const signed = str(signDownload(secret, grant, later));
    const refusals: Array<[string, DownloadGrant, { expires: string; sig: string }, string]> = [
      ['another route', { route: 'wifidogx', firmwareId: fw, deviceId: dev }, signed, secret],
      ['another firmware', { ...grant, firmwareId: dev }, signed, secret],
      ['another device', { ...grant, deviceId: fw }, signed, secret],
      ['another expiry', grant, { ...signed, expires: String(Number(signed.expires) + 1) }, secret],
      ['another secret', grant, signed, 'not the secret'],
    ];
    for (const [what, g, given, key] of refusals)
      assert.deepEqual(verifyDownload(key, g, given), { ok: false, reason: 'bad_signature' }, what);
  });

  it('a grant without a device is not one with an empty device field of another route', () => {
    const signed = str(signDownload(secret, { route: 'firmware', firmwareId: fw }, later));
    assert.equal(verifyDownload(secret, { route: 'grisp', firmwareId: fw }, signed).ok, false);
    assert.equal(verifyDownload(secret, { route: 'wifidogx', firmwareId: fw, deviceId: '' }, signed).ok, false);
  });

  it('says malformed for a missing, repeated or misshapen expiry or signature, and for ids with a newline', () => {
    const grant: DownloadGrant = { route: 'firmware', firmwareId: fw };
    const { expires, sig } = str(signDownload(secret, grant, later));
    for (const given of [
      { expires: undefined, sig },
      { expires, sig: undefined },
      { expires: [expires, expires], sig },
      { expires: '-1', sig },
      { expires: '1e9', sig },
      { expires: '1234567890123', sig },
      { expires, sig: sig.toUpperCase() },
      { expires, sig: sig.slice(1) },
      { expires, sig: Buffer.from(sig, 'hex').toString('base64url') },
    ])
      assert.deepEqual(verifyDownload(secret, grant, given), { ok: false, reason: 'malformed' }, JSON.stringify(given));
    const split = { route: 'wifidogx', firmwareId: `${fw}\n${dev}`, deviceId: '' } as const;
    assert.deepEqual(verifyDownload(secret, split, { expires, sig }), { ok: false, reason: 'malformed' });
  });

  it('says expired only for a genuine signature whose time has passed', () => {
    const grant: DownloadGrant = { route: 'grisp', firmwareId: fw };
    const past = str(signDownload(secret, grant, new Date(Date.now() - 1000)));
    assert.deepEqual(verifyDownload(secret, grant, past), { ok: false, reason: 'expired' });
    const forged = { ...past, sig: past.sig.replace(/.$/, (c) => (c === '0' ? '1' : '0')) };
    assert.deepEqual(verifyDownload(secret, grant, forged), { ok: false, reason: 'bad_signature' });
  });

  it('puts each route into the URL shape its devices expect', () => {
    const at = new Date(1_900_000_000_000);
    const url = (grant: DownloadGrant) => signDownloadUrl({ baseUrl: 'https://h:1/', secret, grant, expiresAt: at });
    const hex = '[0-9a-f]{64}';
    assert.match(
      url({ route: 'firmware', firmwareId: fw }),
      new RegExp(`^https://h:1/firmware/${fw}\\?expires=1900000000&sig=${hex}$`),
    );
    assert.match(url({ route: 'grisp', firmwareId: fw }), new RegExp(`^https://h:1/grisp/fw/${fw}/1900000000/${hex}$`));
    assert.match(
      url({ route: 'wifidogx', firmwareId: fw, deviceId: dev }),
      new RegExp(`^https://h:1/fw/${fw}/${dev}/1900000000/${hex}$`),
    );
    assert.match(
      url({ route: 'keyauth', firmwareId: fw, deviceId: dev }),
      new RegExp(`^https://h:1/api/keyauth/firmware/${fw}\\?device=${dev}&expires=1900000000&sig=${hex}$`),
    );
  });

  it('rounds expiry up to a tenth of the TTL, so a group shares one URL for a while', () => {
    const now = Date.UTC(2026, 0, 1, 0, 0, 7);
    assert.equal(bucketedExpiry(86_400, now).getTime(), Date.UTC(2026, 0, 2, 2, 24, 0));
    assert.equal(bucketedExpiry(86_400, now + 1000).getTime(), bucketedExpiry(86_400, now).getTime());
    assert.ok(bucketedExpiry(10, now).getTime() >= now + 10_000);
  });
});
