import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { main as deviceMain } from '../../device-client/cli.ts';
import { uploadFirmwareStream } from '../../server/cli/firmware.ts';
import { main } from '../../server/cli/index.ts';
import { runCaptured } from '../helpers/cli-io.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';
import { imageChunks } from '../firmware/harness.ts';

interface Run {
  code: number;
  out: string;
  err: string;
}

// A rollout scripted as CI would: simulated devices, a group filled by pattern, a retarget, and
// `status --until` / `simulate --until-version` deciding the exit status.
describe(`scripted rollouts: groups by pattern, status --until, simulate --until-version (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let socketUrl: string;
  let base: { id: string; version: string };
  const env = (): NodeJS.ProcessEnv => ({
    HOME: tmp,
    XDG_CONFIG_HOME: tmp,
    FLEETHUB_URL: server.apiUrl,
    FLEETHUB_TOKEN: server.adminToken,
  });

  async function run(entry: typeof main, argv: string[], signal?: AbortSignal): Promise<Run> {
    return runCaptured(entry, argv, { env: env(), signal });
  }
  const cli = (...argv: string[]) => run(main, argv);

  async function upload(version: string, seed: number) {
    return (await uploadFirmwareStream({
      client: { url: server.apiUrl, token: server.adminToken },
      query: { product: server.productId, version },
      source: Readable.from(imageChunks(24 * 1024, seed)),
    })) as { id: string; version: string };
  }

  /** `fleethub-device simulate` of `count` devices named `<prefix>-NNNN` running the base firmware, until `signal`. */
  async function simulateWith(signal: AbortSignal | undefined, prefix: string, count: number, ...extra: string[]) {
    const pki = await getTestPki();
    const argv = ['simulate', '--count', String(count), '--url', socketUrl, '--pki', pki.dir];
    argv.push('--certs', path.join(tmp, `${prefix}certs`), '--state-dir', path.join(tmp, `${prefix}state`));
    argv.push('--serial-prefix', prefix, '--firmware-uuid', base.id, '--version', base.version, '--json');
    return run(deviceMain, [...argv, ...extra], signal);
  }

  /** The same, until they are done with `version`. */
  const simulate = (prefix: string, count: number, version: string, ...extra: string[]) =>
    simulateWith(undefined, prefix, count, '--until-version', version, ...extra);

  const online = async (prefix: string, count: number) =>
    until(
      async () => {
        const page = await server.call<{ items: { connection_status: string }[] }>(
          'GET',
          `/api/v1/orgs/default/devices?q=${prefix}&status=online`,
        );
        return page.items.length === count;
      },
      `${count} ${prefix}* devices online`,
      60_000,
    );

  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-rollout-'));
    socketUrl = `${server.deviceUrl.replace(/^https/, 'wss')}/socket`;
    base = await upload('1.0.0', 1);
    await upload('1.1.0', 2);
  });
  after(async () => {
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  test('a group filled by --match is rolled out; status --until succeeded and simulate --until-version exit 0 once the server agrees', {
    timeout: 180_000,
  }, async () => {
    const simulation = simulate('roll', 3, '1.1.0');
    await online('roll-', 3);
    assert.equal((await cli('groups', 'create', 'beta', '--product', 'default')).code, 0);
    const added = await cli('groups', 'add', 'beta', '--match', 'roll-*');
    assert.equal(added.code, 0, added.err);
    assert.match(added.out, /^added 3 device\(s\) to beta\n$/);

    assert.equal((await cli('target', 'set', '1.1.0', '--group', 'beta')).code, 0);
    const status = await cli('status', '--group', 'beta', '--until', 'succeeded', '--timeout', '120');
    assert.equal(status.code, 0, status.err);
    assert.match(status.err, /every device of beta runs 1\.1\.0 \(3\)/);
    // Not a terminal: one line per change, never a screen clear.
    assert.doesNotMatch(status.out, /\x1b/);
    assert.match(status.out.trim().split('\n').at(-1)!, /beta: 3 device\(s\), \d online; versions 1\.1\.0=3;/);

    const sim = await simulation;
    assert.equal(sim.code, 0, sim.err);
    assert.equal(JSON.parse(sim.out).summary.succeeded, 3);
    // simulate --until-version returned: the server has recorded every attempt as succeeded already.
    const rows = await server.database.db
      .selectFrom('update_attempts')
      .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
      .select('update_attempts.state')
      .where('devices.identifier', 'like', 'roll-%')
      .execute();
    assert.deepEqual(
      rows.map((r) => r.state),
      ['succeeded', 'succeeded', 'succeeded'],
    );
  });

  test('status counts each device once for its current target, and --until succeeded honours a device-level target', {
    timeout: 180_000,
  }, async () => {
    const serials = ['ovr-0000', 'ovr-0001', 'ovr-0002'];
    for (const identifier of serials)
      await server.call('POST', '/api/v1/orgs/default/devices', { product: 'default', identifier });
    await upload('1.2.0', 3);
    assert.equal((await cli('groups', 'create', 'epsilon', '--product', 'default')).code, 0);
    assert.equal((await cli('groups', 'add', 'epsilon', '--match', 'ovr-*')).code, 0);
    // Three retargets of offline devices: each cancels the attempts of the one before.
    for (const version of ['1.1.0', '1.2.0', '1.1.0'])
      assert.equal((await cli('target', 'set', version, '--group', 'epsilon')).code, 0);
    const history = await server.call<{ total: number }>('GET', '/api/v1/orgs/default/groups/epsilon/updates');
    assert.equal(history.total, 9, 'nine attempts on record');
    const counted = JSON.parse((await cli('status', '--group', 'epsilon', '--json')).out) as {
      devices: number;
      updates: Record<string, number>;
      targets: { version: string; devices: number; running: number }[];
    };
    assert.equal(counted.devices, 3);
    assert.equal(
      Object.values(counted.updates).reduce((a, b) => a + b, 0),
      3,
      `each device once: ${JSON.stringify(counted.updates)}`,
    );
    assert.equal(counted.updates.queued, 3);
    assert.deepEqual(
      counted.targets.map((t) => [t.version, t.devices, t.running]),
      [['1.1.0', 3, 0]],
    );

    // One device gets its own target: it is judged against 1.2.0, the others against 1.1.0.
    assert.equal((await cli('target', 'set', '1.2.0', '--device', 'ovr-0001')).code, 0);
    const split = JSON.parse((await cli('status', '--group', 'epsilon', '--json')).out) as typeof counted;
    assert.deepEqual(split.targets.map((t) => [t.version, t.devices]).sort(), [
      ['1.1.0', 2],
      ['1.2.0', 1],
    ]);
    assert.equal(
      Object.values(split.updates).reduce((a, b) => a + b, 0),
      3,
    );

    const controller = new AbortController();
    const simulation = simulateWith(controller.signal, 'ovr', 3);
    const status = await cli('status', '--group', 'epsilon', '--until', 'succeeded', '--timeout', '120');
    assert.equal(status.code, 0, status.err);
    assert.match(status.err, /every device of epsilon runs their targets \(1\.\d\.0 \d\/\d, 1\.\d\.0 \d\/\d\) \(3\)/);
    const running = await server.call<{ items: { identifier: string; firmware_version: string }[] }>(
      'GET',
      '/api/v1/orgs/default/devices?q=ovr-',
    );
    assert.deepEqual(Object.fromEntries(running.items.map((d) => [d.identifier, d.firmware_version])), {
      'ovr-0000': '1.1.0',
      'ovr-0001': '1.2.0',
      'ovr-0002': '1.1.0',
    });
    const done = JSON.parse((await cli('status', '--group', 'epsilon', '--json')).out) as typeof counted;
    assert.equal(done.updates.succeeded, 3);
    assert.equal(
      Object.values(done.updates).reduce((a, b) => a + b, 0),
      3,
    );
    controller.abort();
    assert.equal((await simulation).code, 0);
  });

  test('status --until succeeded exits 1 naming the devices whose update failed', { timeout: 180_000 }, async () => {
    const simulation = simulate('bad', 2, '1.1.0', '--reject-install-rate', '1');
    await online('bad-', 2);
    assert.equal((await cli('groups', 'create', 'gamma', '--product', 'default')).code, 0);
    assert.equal((await cli('groups', 'add', 'gamma', '--match', 'bad-????')).code, 0);
    assert.equal((await cli('target', 'set', '1.1.0', '--group', 'gamma')).code, 0);
    const status = await cli('status', '--group', 'gamma', '--until', 'succeeded', '--timeout', '120');
    assert.equal(status.code, 1, status.err);
    assert.match(
      status.err,
      /2 device\(s\) of gamma failed to update to 1\.1\.0: bad-000[01] failed \(the installer rejected/,
    );
    const sim = await simulation;
    assert.equal(sim.code, 0, sim.err);
    assert.equal(JSON.parse(sim.out).summary.failed, 2);
  });

  test('status --until online exits 3 on --timeout; --until without a valid state is a usage error', async () => {
    await server.call('POST', '/api/v1/orgs/default/devices', { product: 'default', identifier: 'never-online' });
    assert.equal((await cli('groups', 'create', 'delta', '--product', 'default')).code, 0);
    assert.equal((await cli('groups', 'add', 'delta', 'never-online')).code, 0);
    const status = await cli('status', '--group', 'delta', '--until', 'online', '--timeout', '1');
    assert.equal(status.code, 3);
    assert.match(status.err, /timed out after 1 s waiting for online: 0 of 1 device\(s\) online/);
    assert.equal((await cli('status', '--until', 'done')).code, 2);
    assert.equal((await cli('status', '--until', 'succeeded')).code, 2); // needs --group
  });

  test('groups add/remove by tag and pattern; a selector-less body is refused with 400', async () => {
    for (const id of ['tag-a', 'tag-b', 'other-c'])
      await server.call('POST', '/api/v1/orgs/default/devices', {
        product: 'default',
        identifier: id,
        tags: id.startsWith('tag') ? ['lab'] : [],
      });
    assert.equal((await cli('groups', 'create', 'tagged', '--product', 'default')).code, 0);
    const byTag = await cli('groups', 'add', 'tagged', '--tag', 'lab', '--json');
    assert.equal(byTag.code, 0, byTag.err);
    assert.equal(JSON.parse(byTag.out).added.length, 2);
    // Both conditions when both are given: tagged lab AND matching 'other-*' is nobody.
    const both = await cli('groups', 'add', 'tagged', '--tag', 'lab', '--match', 'other-*', '--json');
    assert.deepEqual(JSON.parse(both.out).added, []);
    // '_' and '%' are literal characters of a glob, not SQL wildcards.
    const literal = await cli('groups', 'add', 'tagged', '--match', 'tag_a', '--json');
    assert.deepEqual(JSON.parse(literal.out).added, []);
    const removed = await cli('groups', 'remove', 'tagged', '--match', 'tag-?');
    assert.equal(removed.code, 0, removed.err);
    assert.match(removed.out, /^removed 2 device\(s\) from tagged\n$/);
    const none = await cli('groups', 'add', 'tagged');
    assert.equal(none.code, 2);
    assert.match(none.err, /needs devices, --match or --tag/);
    const res = await fetch(`${server.apiUrl}/api/v1/orgs/default/groups/tagged/devices`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
      body: '{}',
    });
    assert.equal(res.status, 400);
  });
});
