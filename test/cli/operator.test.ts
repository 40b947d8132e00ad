import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createUser } from '../../server/api/operators.ts';
import { buildGrispPackage } from '../../device-client/simulators/grisp.ts';
import { runOperatorCommand } from '../../server/cli/operator.ts';
import { captureIo, runCaptured } from '../helpers/cli-io.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { waitFor } from '../helpers/phoenix.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

interface Run {
  code: number;
  out: string;
  err: string;
}

describe(`operator CLI against a running server (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let configHome: string;
  const env = (): NodeJS.ProcessEnv => ({ XDG_CONFIG_HOME: configHome, HOME: configHome });

  /** Runs `fleethub <argv>` in-process with captured output. */
  function cli(argv: string[], extraEnv: NodeJS.ProcessEnv = {}, signal?: AbortSignal): Promise<Run> {
    return runCaptured(runOperatorCommand, argv, { env: { ...env(), ...extraEnv }, signal });
  }

  before(async () => {
    server = await startTestServer();
    configHome = mkdtempSync(path.join(os.tmpdir(), 'fleethub-cli-'));
    await createUser(server.database.db, { email: 'ops@example.com', password: 'operator-password', role: 'operator' });
    for (const serial of ['cli-1', 'cli-2', 'cli-3']) {
      await server.call('POST', '/api/v1/orgs/default/devices', { product: 'default', identifier: serial });
    }
  });
  after(async () => {
    await server.close();
    rmSync(configHome, { recursive: true, force: true });
  });

  test('login saves the token in a 0600 credentials file that later commands use', async () => {
    const res = await cli([
      'login',
      '--url',
      server.apiUrl,
      '--email',
      'ops@example.com',
      '--password',
      'operator-password',
    ]);
    assert.equal(res.code, 0, res.err);
    assert.match(res.out, /logged in to .* as ops@example.com \(operator\)/);
    const file = path.join(configHome, 'fleethub', 'credentials.json');
    assert.equal(statSync(file).mode & 0o777, 0o600);
    assert.equal(JSON.parse(readFileSync(file, 'utf8')).profiles.default.url, server.apiUrl);

    const orgs = await cli(['orgs']);
    assert.equal(orgs.code, 0, orgs.err);
    assert.match(orgs.out, /^NAME\s+ID\s+CREATED\ndefault\s+[0-9a-f-]{36}/);
  });

  test("a wrong password exits 1 with the server's message", async () => {
    const res = await cli(['login', '--url', server.apiUrl, '--email', 'ops@example.com', '--password', 'nope']);
    assert.equal(res.code, 1);
    assert.match(res.err, /^error: wrong email or password/);
  });

  test('devices list prints a table, --json a page, and show finds a device by identifier', async () => {
    const table = await cli(['devices', 'list']);
    assert.equal(table.code, 0, table.err);
    assert.match(table.out, /^IDENTIFIER\s+STATUS\s+VERSION/);
    assert.match(table.out, /cli-2\s+offline/);
    const json = await cli(['devices', 'list', '--search', 'cli-', '--json']);
    assert.equal(JSON.parse(json.out).total, 3);
    const show = await cli(['devices', 'show', 'cli-3', '--json']);
    assert.equal(JSON.parse(show.out).identifier, 'cli-3');
    const missing = await cli(['devices', 'show', 'nope']);
    assert.equal(missing.code, 1);
    assert.match(missing.err, /device "nope" not found/);
  });

  test('lists show every item, page after page; --limit caps them and --offset skips', async () => {
    for (let i = 0; i < 150; i++)
      await server.call('POST', '/api/v1/orgs/default/devices', {
        product: 'default',
        identifier: `bulk-${String(i).padStart(3, '0')}`,
      });
    try {
      const json = await cli(['devices', 'list', '--search', 'bulk-', '--json']);
      assert.equal(json.code, 0, json.err);
      const page = JSON.parse(json.out) as { items: { identifier: string }[]; total: number };
      assert.equal(page.total, 150);
      assert.equal(page.items.length, 150);
      assert.equal(new Set(page.items.map((d) => d.identifier)).size, 150);

      const table = await cli(['devices', 'list', '--search', 'bulk-']);
      assert.equal(table.out.trim().split('\n').length, 151, 'a header and 150 rows');
      assert.doesNotMatch(table.out, /use --limit/);

      const capped = await cli(['devices', 'list', '--search', 'bulk-', '--limit', '120', '--offset', '10']);
      assert.equal(capped.code, 0, capped.err);
      const lines = capped.out.trim().split('\n');
      assert.equal(lines.length, 122, 'a header, 120 rows and the footer');
      assert.equal(lines.at(-1), '(11-130 of 150; use --limit/--offset)');
      assert.equal((await cli(['devices', 'list', '--limit', '0'])).code, 2);
    } finally {
      for (let i = 0; i < 150; i++)
        await server.call('DELETE', `/api/v1/orgs/default/devices/bulk-${String(i).padStart(3, '0')}`);
    }
  });

  test('groups are created, filled, listed, emptied and deleted from the CLI', async () => {
    assert.equal((await cli(['groups', 'create', 'lab', '--product', 'default'])).code, 0);
    const added = await cli(['groups', 'add', 'lab', 'cli-1', 'cli-2', 'cli-3']);
    assert.equal(added.code, 0, added.err);
    assert.match(added.out, /added 3 device\(s\) to lab/);
    const list = await cli(['groups', 'list', '--json']);
    assert.equal(JSON.parse(list.out).find((g: { name: string }) => g.name === 'lab').device_count, 3);
    const removed = await cli(['groups', 'remove', 'lab', 'cli-3']);
    assert.match(removed.out, /removed 1 device\(s\) from lab/);
    const members = await cli(['groups', 'members', 'lab', '--json']);
    assert.equal(JSON.parse(members.out).total, 2);
    const filtered = await cli(['devices', 'list', '--group', 'lab', '--json']);
    assert.equal(JSON.parse(filtered.out).total, 2);
  });

  test('firmware is listed, a group is retargeted by version, status counts it, and the target is cleared', async () => {
    const upload = await fetch(`${server.apiUrl}/api/v1/firmware?org=default&product=default&version=1.2.0`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
      body: Buffer.alloc(4096, 7),
    });
    assert.equal(upload.status, 201, await upload.clone().text());

    // A second variant of the release, in GRiSP's package format.
    const grisp = await fetch(
      `${server.apiUrl}/api/v1/firmware?org=default&product=default&version=1.2.0&format=grisp`,
      {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
        body: new Uint8Array(await buildGrispPackage({ version: '1.2.0', blocks: [Buffer.alloc(512, 1)] })),
      },
    );
    assert.equal(grisp.status, 201, await grisp.clone().text());

    const firmware = await cli(['firmware', 'list']);
    assert.equal(firmware.code, 0, firmware.err);
    assert.match(firmware.out, /^VERSION\s+COMPONENT\s+FORMAT\s/m);
    assert.match(firmware.out, /^1\.2\.0\s+firmware\s+raw\s/m);
    assert.match(firmware.out, /^1\.2\.0\s+firmware\s+grisp\s/m);

    const set = await cli(['target', 'set', '1.2.0', '--group', 'lab']);
    assert.equal(set.code, 0, set.err);
    assert.match(set.out, /group lab now targets 1\.2\.0: 0 device\(s\) told now, 2 queued/);

    const status = await cli(['status', '--group', 'lab']);
    assert.equal(status.code, 0, status.err);
    assert.match(status.out, /lab: 2 device\(s\), 0 online, 2 offline/);
    assert.match(status.out, /queued\s+2/);
    const json = JSON.parse((await cli(['status', '--group', 'lab', '--json'])).out);
    assert.equal(json.updates.queued, 2);

    // Per device: each member with its resolved target, running version and newest attempt.
    const table = await cli(['status', '--group', 'lab', '--per-device']);
    assert.equal(table.code, 0, table.err);
    assert.match(table.out, /^DEVICE\s+PROTOCOL\s+STATUS\s+RUNNING\s+TARGET\s+VIA\s+STATE\s+ATTEMPT\s+UPDATED$/m);
    assert.match(table.out, /^cli-1\s+phoenix\s+offline\s+\S+\s+1\.2\.0\s+group:[0-9a-f-]{36}\s+queued\s+queued\s/m);
    assert.match(table.out, /^cli-2\s+phoenix\s+offline\s+\S+\s+1\.2\.0\s+group:[0-9a-f-]{36}\s+queued\s+queued\s/m);
    const rows = JSON.parse((await cli(['status', '--group', 'lab', '--per-device', '--json'])).out) as Array<{
      identifier: string;
      state: string;
      target_version: string;
      attempt_id: string;
    }>;
    assert.deepEqual(
      rows.map((r) => [r.identifier, r.state, r.target_version]),
      [
        ['cli-1', 'queued', '1.2.0'],
        ['cli-2', 'queued', '1.2.0'],
      ],
    );
    assert.ok(rows.every((r) => typeof r.attempt_id === 'string'));
    const none = await cli(['status', '--group', 'lab', '--per-device', '--state', 'succeeded']);
    assert.equal(none.out, '(no device is succeeded)\n');
    // Paged, with the total; bad input is a 400 that names the field.
    const page = await server.call<{ items: Array<{ identifier: string }>; total: number }>(
      'GET',
      '/api/v1/orgs/default/status/devices?group=lab&limit=1&offset=1',
    );
    assert.deepEqual(
      page.items.map((d) => d.identifier),
      ['cli-2'],
    );
    assert.equal(page.total, 2);
    const past = await server.call<{ items: unknown[]; total: number }>(
      'GET',
      '/api/v1/orgs/default/status/devices?group=lab&offset=5',
    );
    assert.deepEqual(past, { items: [], total: 2 });
    for (const query of ['state=bogus', 'limit=0', 'offset=-1']) {
      const res = await fetch(`${server.apiUrl}/api/v1/orgs/default/status/devices?group=lab&${query}`, {
        headers: { authorization: `Bearer ${server.adminToken}` },
      });
      assert.equal(res.status, 400, query);
    }
    const unknown = await fetch(`${server.apiUrl}/api/v1/orgs/default/status/devices?group=no-such-group`, {
      headers: { authorization: `Bearer ${server.adminToken}` },
    });
    assert.equal(unknown.status, 404);
    assert.equal((await cli(['status', '--per-device', '--watch'])).code, 2);
    assert.equal((await cli(['status', '--state', 'failed'])).code, 2);

    assert.equal((await cli(['target', 'clear', '--group', 'lab'])).code, 0);
    const again = await cli(['target', 'clear', '--group', 'lab']);
    assert.equal(again.code, 1);
    assert.match(again.err, /has no firmware target/);
  });

  test('status --watch prints a line when a live event changes the counts', async () => {
    const captured = captureIo({ env: env() });
    const running = runOperatorCommand(['status', '--watch', '--json'], captured.io);
    await waitFor(() => captured.out.split('\n').filter(Boolean).length >= 1, 10_000, 'first render');
    // Give the socket time to join, then change the counts (a new device).
    await new Promise((r) => setTimeout(r, 500));
    const before = JSON.parse(captured.out.split('\n')[0]!).devices as number;
    await server.call('POST', '/api/v1/orgs/default/devices', { product: 'default', identifier: 'watch-1' });
    await waitFor(() => captured.out.split('\n').filter(Boolean).length >= 2, 10_000, 'a line after the change');
    captured.abort();
    assert.equal(await running, 0);
    const lines = captured.out.split('\n').filter(Boolean);
    // One line per change: the same counts are not printed twice.
    assert.equal(lines.length, 2);
    assert.equal(JSON.parse(lines[1]!).devices, before + 1);
    await server.call('DELETE', '/api/v1/orgs/default/devices/watch-1');
  });

  test('tokens are created with a lower role, used, listed and revoked; a viewer token cannot retarget', async () => {
    const created = await cli(['tokens', 'create', 'read-only', '--role', 'viewer', '--json']);
    assert.equal(created.code, 0, created.err);
    const { token, api_token } = JSON.parse(created.out);
    assert.match(token, /^fht_/);

    const asViewer = await cli(['devices', 'list', '--json'], { FLEETHUB_TOKEN: token });
    assert.equal(asViewer.code, 0);
    const refused = await cli(['target', 'set', '1.2.0', '--group', 'lab'], { FLEETHUB_TOKEN: token });
    assert.equal(refused.code, 1);
    assert.match(refused.err, /needs the operator role; you are viewer/);

    const list = await cli(['tokens', 'list']);
    assert.match(list.out, new RegExp(`${api_token.id}\\s+read-only\\s+viewer`));
    assert.equal((await cli(['tokens', 'revoke', api_token.id])).code, 0);
    const revoked = await cli(['devices', 'list'], { FLEETHUB_TOKEN: token });
    assert.equal(revoked.code, 1);
    assert.match(revoked.err, /API token was revoked/);
  });

  test("products set-timeout sets a product's in-flight update timeout, and default clears it", async () => {
    const admin = { FLEETHUB_TOKEN: server.adminToken, FLEETHUB_URL: server.apiUrl };
    const set = await cli(['products', 'set-timeout', 'default', '900'], admin);
    assert.equal(set.code, 0, set.err);
    assert.match(set.out, /product default: updates time out after 900 s/);
    assert.match((await cli(['products', 'list'], admin)).out, /default\s+[0-9a-f-]{36}\s+\S+\s+900 s/);
    assert.equal((await cli(['products', 'set-timeout', 'default', '5'], admin)).code, 1, 'below 60 s');
    assert.equal((await cli(['products', 'set-timeout', 'default', 'soon'], admin)).code, 2);
    assert.equal((await cli(['products', 'set-timeout', 'default', '900'])).code, 1, 'operators may not');
    const cleared = await cli(['products', 'set-timeout', 'default', 'default', '--json'], admin);
    assert.equal(JSON.parse(cleared.out).update_timeout_seconds, null);
  });

  test("the edges' commands go through the generated client: tokens, lists, the server's errors", async () => {
    const admin = { FLEETHUB_TOKEN: server.adminToken, FLEETHUB_URL: server.apiUrl };
    const link = await cli(['grisp', 'link-token', '--ttl', '600', '--json'], admin);
    assert.equal(link.code, 0, link.err);
    assert.equal(typeof JSON.parse(link.out).token, 'string');
    const added = await cli(['main-server', 'add', 'raspi-op-1', '--name', 'lab pi', '--json'], admin);
    assert.equal(added.code, 0, added.err);
    assert.match(JSON.parse(added.out).device_token, /^fhd_/);
    const listed = await cli(['main-server', 'devices', '--json'], admin);
    assert.deepEqual(
      JSON.parse(listed.out).map((d: { device_id: string }) => d.device_id),
      ['raspi-op-1'],
    );
    const keys = await cli(['keyauth', 'list', '--json'], admin);
    assert.equal(keys.code, 0, keys.err);
    assert.deepEqual(JSON.parse(keys.out), []);
    const gateway = await cli(['wifidogx', 'show', 'no-such-gateway'], admin);
    assert.equal(gateway.code, 1);
    assert.match(gateway.err, /^error: .*no-such-gateway/);
    const logs = await cli(['devices', 'logs', 'no-such-board'], admin);
    assert.equal(logs.code, 1);
    assert.match(logs.err, /no-such-board/);
  });

  test('--help prints usage with exit 0; bad usage exits 2', async () => {
    for (const command of [
      'login',
      'orgs',
      'products',
      'devices',
      'groups',
      'firmware',
      'target',
      'status',
      'tokens',
    ]) {
      const res = await cli([command, '--help']);
      assert.equal(res.code, 0, command);
      assert.match(res.out, /Usage/, command);
    }
    assert.equal((await cli(['devices', 'list', '--colour'])).code, 2);
    assert.equal((await cli(['target', 'set', '1.0.0'])).code, 2);
    assert.equal((await cli(['frobnicate'])).code, 2);
  });

  test('the fleethub binary dispatches operator commands to the same code', async () => {
    const result = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(
        process.execPath,
        ['--import', 'tsx', 'server/cli/index.ts', 'devices', 'list', '--json', '--search', 'cli-'],
        {
          env: { ...process.env, ...env(), FLEETHUB_URL: server.apiUrl, FLEETHUB_TOKEN: server.adminToken },
          timeout: 60_000,
        },
        (err, stdout, stderr) =>
          resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
    });
    assert.equal(result.code, 0, result.stderr);
    assert.equal(JSON.parse(result.stdout).total, 3);
  });

  test('without a reachable server the CLI says where it tried', async () => {
    const res = await cli(['orgs'], { FLEETHUB_URL: 'http://127.0.0.1:9', FLEETHUB_TOKEN: 'x' });
    assert.equal(res.code, 1);
    assert.match(res.err, /cannot reach http:\/\/127\.0\.0\.1:9/);
  });
});
