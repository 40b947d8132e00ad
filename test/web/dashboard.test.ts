/**
 * The operator dashboard in a real browser (Debian's chromium driven by playwright-core) against
 * the whole server in-process; the device is the official phoenix client over mutual TLS.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Channel, Socket } from 'phoenix';
import { chromium, type Browser, type Page } from 'playwright-core';
import { createUser } from '../../server/api/index.ts';
import { createDevice, SYSTEM } from '../../server/fleet/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, nextEvent, openSocket, pushAndWait } from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const UI_TIMEOUT = 10_000;

interface Firmware {
  id: string;
  version: string;
  sha256: string;
  size: number;
}

describe(`operator dashboard in a real browser (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let browser: Browser;
  let page: Page;
  const email = `operator-${randomBytes(4).toString('hex')}@example.com`;
  const password = 'dashboard-password-1';
  const sockets: Socket[] = [];
  /** Uncaught errors and CSP violations in the page: each test ends by asserting there were none. */
  const pageErrors: string[] = [];
  let v1: Firmware;
  const serial = `dash-${randomBytes(3).toString('hex')}`;
  let device: { socket: Socket; channel: Channel; groupChannels: Channel[] };

  before(async () => {
    // The default Origin policy (the Origin's host must be the Host the page came from), as in production.
    server = await startTestServer({ allowedOrigins: [] });
    await createUser(server.database.db, { email, password, role: 'admin' });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
    });
    page = await browser.newPage();
    page.setDefaultTimeout(UI_TIMEOUT);
    page.on('pageerror', (err) => pageErrors.push(`page error: ${err.message}`));
    page.on('console', (msg) => {
      if (msg.type() === 'error' && /Content Security Policy|Refused to/.test(msg.text())) pageErrors.push(msg.text());
    });
    v1 = await upload('1.0.0');
  });

  after(async () => {
    await Promise.allSettled(sockets.map((s) => disconnectSocket(s)));
    await page?.close().catch(() => {});
    await browser?.close().catch(() => {});
    await server?.close();
  });

  async function upload(version: string): Promise<Firmware> {
    const qs = new URLSearchParams({ product: server.productId, version });
    const res = await fetch(`${server.apiUrl}/api/v1/firmware?${qs}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
      body: randomBytes(32 * 1024),
    });
    assert.equal(res.status, 201, await res.clone().text());
    return (await res.json()) as Firmware;
  }

  /** Connects the official phoenix client as a device running `firmware`; it joins group channels it is told about. */
  async function connectDevice(identifier: string, firmware: Firmware) {
    const socket = await openSocket(`${server.deviceUrl.replace(/^https/, 'wss')}/socket`, {
      tls: await deviceTlsOptions(await deviceCert(identifier)),
    });
    sockets.push(socket);
    const channel = socket.channel(`device:${firmware.id}`, {});
    const groupChannels: Channel[] = [];
    channel.on('join', ({ channel: topic }: { channel: string }) => {
      const group = socket.channel(topic, {});
      groupChannels.push(group);
      void joinChannel(group);
    });
    await joinChannel(channel);
    return { socket, channel, groupChannels };
  }

  /** Marks the page; `assertNotReloaded` proves the view changed live, not by a reload. */
  async function markPage(): Promise<void> {
    await page.evaluate(() => Object.assign(window, { __notReloaded: true }));
  }
  async function assertNotReloaded(): Promise<void> {
    assert.equal(
      await page.evaluate(() => (window as unknown as { __notReloaded?: boolean }).__notReloaded),
      true,
      'the page was reloaded',
    );
  }

  function deviceRow(identifier: string) {
    return page.locator('tbody tr').filter({ has: page.getByRole('rowheader', { name: identifier, exact: true }) });
  }

  test('the page and its modules carry a strict Content-Security-Policy, and the phoenix module is the installed package', async () => {
    const res = await fetch(`${server.apiUrl}/`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/html/);
    const csp = res.headers.get('content-security-policy') ?? '';
    assert.match(csp, /default-src 'self'/);
    assert.match(csp, /connect-src 'self' ws: wss:/);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
    assert.equal(res.headers.get('x-content-type-options'), 'nosniff');

    const phoenix = await fetch(`${server.apiUrl}/ui/vendor/phoenix.mjs`);
    assert.equal(phoenix.status, 200);
    assert.match(phoenix.headers.get('content-type') ?? '', /^text\/javascript/);
    const installed = path.join(path.dirname(createRequire(import.meta.url).resolve('phoenix')), 'phoenix.mjs');
    assert.equal(await phoenix.text(), readFileSync(installed, 'utf8'));

    for (const url of ['/ui/missing.js', '/ui/..%2Fpackage.json', '/ui/index.html']) {
      assert.equal((await fetch(`${server.apiUrl}${url}`)).status, 404, url);
    }
  });

  test('a wrong password is refused on the sign-in form with the server’s message', async () => {
    await page.goto(server.apiUrl);
    await page.getByLabel('Email').fill(email);
    await page.getByLabel('Password').fill('not-the-password');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByRole('alert').filter({ hasText: 'wrong email or password' }).waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('fleethub.token')), null);
  });

  test('an operator signs in and the dashboard goes live on the org’s operator channel', async () => {
    await page.goto(server.apiUrl);
    await page.getByLabel('Email').fill(email);
    await page.getByLabel('Password').fill(password);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#live-status', { hasText: 'Live' }).waitFor();
    assert.ok(await page.evaluate(() => sessionStorage.getItem('fleethub.token')), 'the JWT is kept in sessionStorage');
    assert.equal(await page.getByLabel('Organization').inputValue(), server.orgId);
    await page.getByRole('heading', { name: 'Devices' }).waitFor();
    assert.deepEqual(pageErrors, []);
  });

  test('a device that connects with the official phoenix client appears online without a reload', async () => {
    await markPage();
    device = await connectDevice(serial, v1);
    const row = deviceRow(serial);
    await row.locator('[data-col=status]', { hasText: 'online' }).waitFor();
    assert.equal((await row.locator('[data-col=version]').textContent())?.trim(), '1.0.0');
    assert.match((await row.textContent()) ?? '', /phoenix/);
    await assertNotReloaded();

    // The status filter narrows the list to what matches.
    await page.getByLabel('Status').selectOption('offline');
    await row.waitFor({ state: 'detached' });
    await page.getByLabel('Status').selectOption('online');
    await row.waitFor();
    assert.deepEqual(pageErrors, []);
  });

  test('retargeting a group from the dashboard sends firmware_update to its device and shows its progress live', async () => {
    const v2 = await upload('2.0.0');
    await markPage();
    await page.getByRole('link', { name: 'Groups & updates' }).click();
    const groupName = `canary-${randomBytes(2).toString('hex')}`;
    await page.getByLabel('Name').fill(groupName);
    await page.getByRole('button', { name: 'Create group' }).click();
    await page.getByRole('heading', { name: `Group ${groupName}` }).waitFor();

    const joinPush = nextEvent(device.channel, 'join', UI_TIMEOUT);
    await page.getByLabel('Add devices (identifiers or ids, comma-separated)').fill(serial);
    await page.getByRole('button', { name: 'Add', exact: true }).click();
    await joinPush;
    await page.locator('article tbody tr').filter({ hasText: serial }).first().waitFor();

    // The device listens on its own channel and on the group channel it joined.
    const update = new Promise<Record<string, unknown>>((resolve) => {
      for (const ch of [device.channel, ...device.groupChannels]) ch.on('firmware_update', resolve);
    });
    await page.getByLabel('Firmware version').selectOption({ label: '2.0.0' });
    await page.getByRole('button', { name: 'Set target' }).click();
    const payload = await withTimeout(update, UI_TIMEOUT, 'firmware_update at the device');
    assert.equal(payload.version, '2.0.0');
    assert.equal(payload.sha256, v2.sha256);
    assert.equal(payload.size, v2.size);

    const attempt = page.locator('tr[data-attempt-id]').filter({ hasText: serial });
    await attempt.locator('[data-col=state]', { hasText: 'sent' }).waitFor();
    await page.locator('[data-col=target]', { hasText: 'Runs 2.0.0' }).waitFor();

    assert.equal((await pushAndWait(device.channel, 'firmware_update_begin', { version: '2.0.0' })).status, 'ok');
    assert.equal(
      (
        await pushAndWait(device.channel, 'firmware_update_progress', {
          version: '2.0.0',
          percent: 42,
          bytes: 13763,
          total: v2.size,
        })
      ).status,
      'ok',
    );
    const bar = attempt.getByRole('progressbar', { name: `Update progress of ${serial}` });
    await page.waitForFunction((el) => (el as HTMLProgressElement | null)?.value === 42, await bar.elementHandle(), {
      timeout: UI_TIMEOUT,
    });
    await attempt.locator('[data-col=state]', { hasText: 'downloading' }).waitFor();
    await page.locator('dd[data-state=downloading]', { hasText: '1' }).waitFor();
    await assertNotReloaded();

    await page.getByRole('link', { name: 'Audit log' }).click();
    await page.getByRole('rowheader', { name: 'target.set' }).first().waitFor();
    assert.deepEqual(pageErrors, []);
  });

  test('strings from the fleet are rendered as text, never as markup', async () => {
    const hostile = `<img src=x onerror="window.__xss=1">${randomBytes(2).toString('hex')}`;
    await server.call('POST', `/api/v1/orgs/${server.orgId}/devices`, {
      product: server.productId,
      identifier: hostile,
    });
    await page.getByRole('link', { name: 'Devices', exact: true }).click();
    await page.getByLabel('Search').fill(hostile.slice(-12));
    await deviceRow(hostile).waitFor();
    assert.equal(await page.locator('main img').count(), 0);
    assert.equal(await page.evaluate(() => (window as unknown as { __xss?: number }).__xss), undefined);
    await page.getByLabel('Search').fill('');
  });

  test('devices awaiting approval are listed with Approve and Reject, enabled where the API offers an approval route', async () => {
    const paths = Object.keys(
      ((await (await fetch(`${server.apiUrl}/api/docs/json`)).json()) as { paths: Record<string, unknown> }).paths,
    );
    const approvable = (protocol: string) =>
      paths.some(
        (p) =>
          p.endsWith('/orgs/{org}/devices/{device}/approve') || p === `/api/v1/${protocol}/devices/{device}/approve`,
      );
    const pending = [];
    for (const protocol of ['wifidogx', 'main-server'] as const) {
      const identifier = `${protocol}-${randomBytes(3).toString('hex')}`;
      await createDevice(server.fleet, SYSTEM, {
        orgId: server.orgId,
        productId: server.productId,
        identifier,
        protocol,
        approval: 'pending',
      });
      pending.push({ identifier, protocol });
    }
    await page.getByRole('link', { name: 'Pending devices' }).click();
    for (const { identifier, protocol } of pending) {
      const row = deviceRow(identifier);
      await row.waitFor();
      const approve = row.getByRole('button', { name: `Approve ${identifier}` });
      const reject = row.getByRole('button', { name: `Reject ${identifier}` });
      if (approvable(protocol)) {
        // The server offers approval for this device: the button approves and the device leaves the list.
        await approve.click();
        await row.waitFor({ state: 'detached' });
        const approved = await server.database.db
          .selectFrom('devices')
          .select('approval')
          .where('identifier', '=', identifier)
          .executeTakeFirstOrThrow();
        assert.equal(approved.approval, 'approved', identifier);
      } else {
        // No approval route for it yet: the buttons say so instead of failing on click.
        assert.equal(await approve.isDisabled(), true, identifier);
        assert.equal(await reject.isDisabled(), true, identifier);
        await page.getByText(`no approval route for ${protocol}`).waitFor();
      }
    }
    assert.deepEqual(pageErrors, []);
  });

  test('signing out ends the session on the server: its token gets 401 (session revoked) at once', async () => {
    const token = await page.evaluate(() => sessionStorage.getItem('fleethub.token'));
    assert.ok(token, 'signed in from the earlier tests');
    const me = () => fetch(`${server.apiUrl}/api/v1/auth/me`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal((await me()).status, 200);
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByText('You signed out.').waitFor();
    const res = await me();
    assert.equal(res.status, 401);
    const body = (await res.json()) as { error: { details: { reason: string }; message: string } };
    assert.equal(body.error.details.reason, 'session_revoked');
    assert.match(body.error.message, /revoked \(signed out\)/);
    assert.deepEqual(pageErrors, []);
  });

  test('a session the server no longer accepts returns to the sign-in form with the server’s reason', async () => {
    // Set before the app's scripts run on the reload: set from the running page, a request that
    // page still makes with the bad token gets its 401 and signs out (clearing storage) first.
    await page.addInitScript(() => {
      sessionStorage.setItem('fleethub.token', 'not-a-valid-token');
      sessionStorage.setItem('fleethub.expires_at', new Date(Date.now() + 3_600_000).toISOString());
    });
    await page.reload();
    await page.getByRole('button', { name: 'Sign in' }).waitFor();
    await page.getByRole('alert').filter({ hasText: 'the bearer token is invalid' }).waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('fleethub.token')), null);
  });
});

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
