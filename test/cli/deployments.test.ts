/**
 * `fleethub deployments` against a real server with simulated devices (`fleethub-device simulate`,
 * with `--bad-version` rehearsing a bad release): `watch` exits 0 once a deployment completed,
 * 4 when it paused at its error threshold, 5 once aborted; the server's validation errors are
 * said in the command's flags.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { main as deviceMain } from '../../device-client/cli.ts';
import { uploadFirmwareStream } from '../../server/cli/firmware.ts';
import { progressBar } from '../../server/cli/deployment-view.ts';
import { emptyCounts } from '../../server/fleet/deployments/index.ts';
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

describe(`fleethub deployments against simulated devices (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let base: { id: string; version: string };
  const sims: AbortController[] = [];
  const running: Promise<Run>[] = [];
  const env = (): NodeJS.ProcessEnv => ({
    HOME: tmp,
    XDG_CONFIG_HOME: tmp,
    FLEETHUB_URL: server.apiUrl,
    FLEETHUB_TOKEN: server.adminToken,
  });

  const run = (entry: typeof main, argv: string[], o: { signal?: AbortSignal; isTTY?: boolean } = {}): Promise<Run> =>
    runCaptured(entry, argv, { ...o, env: env() });
  const cli = (...argv: string[]) => run(main, argv);

  async function upload(version: string, seed: number) {
    return (await uploadFirmwareStream({
      client: { url: server.apiUrl, token: server.adminToken },
      query: { product: server.productId, version },
      source: Readable.from(imageChunks(24 * 1024, seed)),
      size: 24 * 1024,
    })) as { id: string; version: string };
  }

  /** `fleethub-device simulate` of `count` devices `<prefix>-NNNN` on the base firmware, until stopped. */
  async function simulate(prefix: string, count: number, ...extra: string[]): Promise<void> {
    const pki = await getTestPki();
    const stop = new AbortController();
    sims.push(stop);
    running.push(
      run(
        deviceMain,
        [
          'simulate',
          '--count',
          String(count),
          '--url',
          `${server.deviceUrl.replace(/^https/, 'wss')}/socket`,
          '--pki',
          pki.dir,
          '--certs',
          path.join(tmp, `${prefix}-certs`),
          '--state-dir',
          path.join(tmp, `${prefix}-state`),
          '--serial-prefix',
          prefix,
          '--firmware-uuid',
          base.id,
          '--version',
          base.version,
          '--stagger-ms',
          '2',
          ...extra,
        ],
        { signal: stop.signal },
      ),
    );
    await until(
      async () => {
        const page = await server.call<{ total: number }>(
          'GET',
          `/api/v1/orgs/default/devices?q=${prefix}-&status=online&limit=1`,
        );
        return page.total === count;
      },
      `${count} ${prefix}-* devices online`,
      90_000,
    );
    assert.equal((await cli('groups', 'create', prefix, '--product', 'default')).code, 0);
    const added = await cli('groups', 'add', prefix, '--match', `${prefix}-*`);
    assert.equal(added.code, 0, added.err);
  }

  /** Which devices (by identifier) are in each state of the deployment. */
  async function devicesByState(name: string): Promise<Record<string, string[]>> {
    const res = await cli('deployments', 'devices', name, '--limit', '1000', '--json');
    assert.equal(res.code, 0, res.err);
    const out: Record<string, string[]> = {};
    for (const d of (JSON.parse(res.out) as { items: Array<{ identifier: string; state: string }> }).items)
      out[d.state] = [...(out[d.state] ?? []), d.identifier];
    for (const list of Object.values(out)) list.sort();
    return out;
  }

  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-deployments-'));
    base = await upload('1.0.0', 1);
    await upload('2.0.0', 2);
    await upload('3.0.0', 3);
  });
  after(async () => {
    for (const s of sims) s.abort();
    await Promise.all(running);
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  test('watch exits 0 once a canary-then-rest deployment completed; on a terminal it draws a bar per stage', {
    timeout: 180_000,
  }, async () => {
    await simulate('good', 6);
    const created = await cli(
      'deployments',
      'create',
      '2.0.0',
      '--group',
      'good',
      '--name',
      'good-rollout',
      '--canary',
      '2',
      '--stage',
      'rest',
      '--max-concurrent',
      '3',
    );
    assert.equal(created.code, 0, created.err);
    assert.match(created.out, /^created deployment [0-9a-f-]{36} \(good-rollout\)\n/);
    assert.match(created.out, /canary\s+2\b/);

    const watched = await cli('deployments', 'watch', 'good-rollout', '--timeout', '150');
    assert.equal(watched.code, 0, watched.err);
    assert.match(watched.err, /completed: 6 of 6 device\(s\) succeeded, 0 failed/);
    // Not a terminal: a line per change, never a screen clear.
    assert.doesNotMatch(watched.out, /\x1b/);
    assert.match(watched.out.trim().split('\n').at(-1)!, /good-rollout \(2\.0\.0\) completed.*canary 2\/2 ok 0 failed/);
    assert.deepEqual(await devicesByState('good-rollout'), {
      succeeded: ['good-0000', 'good-0001', 'good-0002', 'good-0003', 'good-0004', 'good-0005'],
    });

    // On a terminal: one drawing (no earlier one to clear), a progress bar per stage and the total, full of succeeded cells.
    const drawn = await run(main, ['deployments', 'watch', 'good-rollout'], { isTTY: true });
    assert.equal(drawn.code, 0, drawn.err);
    assert.match(drawn.out, /^ {2}canary {3}\[#{30}\] {2}2\/2 told, 2 succeeded/m);
    assert.match(drawn.out, /^ {2}stage 2 {2}\[#{30}\] {2}4\/4 told, 4 succeeded/m);
    assert.match(drawn.out, /^ {2}total {4}\[#{30}\] {2}6\/6 told/m);
    assert.match(
      drawn.out,
      /^ {2}# succeeded {2}x failed or cancelled {2}~ in flight {2}r retrying {2}p penalty box {2}\. not told$/m,
    );
  });

  test('a bad release pauses at the canary: watch exits 4, nobody past the canary was told; abort: watch exits 5', {
    timeout: 180_000,
  }, async () => {
    // Half of the devices fail 3.0.0, by index: bad-0001, bad-0003, ...
    await simulate('bad', 12, '--bad-version', '3.0.0', '--bad-mode', 'fail', '--bad-fraction', '0.5');
    const created = await cli(
      'deployments',
      'create',
      '3.0.0',
      '--group',
      'bad',
      '--name',
      'bad-rollout',
      '--canary',
      '4',
      '--stage',
      '50%',
      '--stage',
      'rest',
      '--error-threshold',
      '25%',
      '--min-finished',
      '4',
      '--on-error',
      'pause',
    );
    assert.equal(created.code, 0, created.err);
    const watched = await cli('deployments', 'watch', 'bad-rollout', '--timeout', '150');
    assert.equal(watched.code, 4, `${watched.out}\n${watched.err}`);
    assert.match(watched.err, /paused at stage 1.*\(2 succeeded, 2 failed, 8 not told\)/);
    assert.deepEqual(await devicesByState('bad-rollout'), {
      succeeded: ['bad-0000', 'bad-0002'],
      failed: ['bad-0001', 'bad-0003'],
      pending: ['bad-0004', 'bad-0005', 'bad-0006', 'bad-0007', 'bad-0008', 'bad-0009', 'bad-0010', 'bad-0011'],
    });
    const shown = await cli('deployments', 'show', 'bad-rollout');
    assert.equal(shown.code, 0, shown.err);
    assert.match(shown.out, /^state\s+paused$/m);
    // told, in flight, retrying, penalty box, succeeded, failed
    assert.match(shown.out, /^canary\s+4\s+4\s+0\s+0\s+0\s+2\s+2\s+100%\s+25% of ≥4 finished → pause/m);

    const aborted = await cli('deployments', 'abort', 'bad-rollout', '--reason', 'bad release');
    assert.equal(aborted.code, 0, aborted.err);
    const after = await cli('deployments', 'watch', 'bad-rollout', '--timeout', '30');
    assert.equal(after.code, 5, after.err);
    assert.match(after.err, /aborted: bad release \(2 succeeded, 2 failed, 0 cancelled, 8 never told\)/);
    // Aborted is final: resume is refused, and the server's reason is printed.
    const resumed = await cli('deployments', 'resume', 'bad-rollout');
    assert.equal(resumed.code, 1);
    assert.match(resumed.err, /^error: /);
  });

  test('retries and the penalty box: a device that keeps failing is held out, and show and devices say so', {
    timeout: 180_000,
  }, async () => {
    // pbx-0001 fails 2.0.0 every time (after beginning it: a failure worth retrying).
    await simulate('pbx', 2, '--bad-version', '2.0.0', '--bad-mode', 'fail', '--bad-fraction', '0.5');
    const created = await cli(
      'deployments',
      'create',
      '2.0.0',
      '--group',
      'pbx',
      '--name',
      'pbx-rollout',
      '--retries',
      '1',
      '--retry-backoff',
      '0',
      '--penalty',
      '1/1h/1h',
    );
    assert.equal(created.code, 0, created.err);
    assert.match(created.out, /^retries\s+1, backoff 0 s doubling$/m);
    assert.match(created.out, /^penalty_box\s+1 failures within 3600 s: held out 3600 s$/m);
    await until(
      async () =>
        JSON.stringify(await devicesByState('pbx-rollout')) ===
        JSON.stringify({ succeeded: ['pbx-0000'], penalty_box: ['pbx-0001'] }),
      'pbx-0001 in the penalty box',
      90_000,
    );
    const shown = await cli('deployments', 'show', 'pbx-rollout');
    assert.equal(shown.code, 0, shown.err);
    assert.match(shown.out, /^state\s+running$/m);
    assert.match(shown.out, /^devices\s+2\/2 told, 1 succeeded, 0 failed, 0 in flight, 1 in the penalty box$/m);
    // told, in flight, retrying, penalty box, succeeded, failed
    assert.match(shown.out, /^stage 1\s+2 \(rest\)\s+2\s+0\s+0\s+1\s+1\s+0\s/m);
    // watch: the held device has its own glyph on a terminal (half the bar: 1 of 2), and is counted in plain lines.
    const drawn = await run(main, ['deployments', 'watch', 'pbx-rollout', '--timeout', '1'], { isTTY: true });
    assert.equal(drawn.code, 3, drawn.err);
    assert.match(
      drawn.out,
      /^ {2}stage 1 {2}\[#{15}p{15}\] {2}2\/2 told, 1 succeeded, 0 failed, 0 in flight, 1 in the penalty box/m,
    );
    assert.match(drawn.out, /r retrying {2}p penalty box/);
    const lines = await cli('deployments', 'watch', 'pbx-rollout', '--timeout', '1');
    assert.equal(lines.code, 3, lines.err);
    assert.match(
      lines.out,
      /pbx-rollout \(2\.0\.0\) running; stage 1 1\/2 ok 0 failed 0 in flight 0 retrying 1 penalty box$/m,
    );
    const held = await cli('deployments', 'devices', 'pbx-rollout', '--state', 'penalty_box');
    assert.equal(held.code, 0, held.err);
    assert.match(held.out, /pbx-0001\s+phoenix\s+1\s+penalty_box\s+1\s/);
    // Abort: a held device is not told again; its failure stands.
    assert.equal((await cli('deployments', 'abort', 'pbx-rollout')).code, 0);
    assert.deepEqual(await devicesByState('pbx-rollout'), { succeeded: ['pbx-0000'], failed: ['pbx-0001'] });
  });

  test('the progress bar: a glyph per state, and any state holding a device shows at least one cell', () => {
    const counts = (c: Partial<ReturnType<typeof emptyCounts>>) => ({ ...emptyCounts(), ...c });
    assert.equal(
      progressBar(
        counts({ total: 10, succeeded: 2, failed: 1, cancelled: 1, in_flight: 2, retrying: 1, penalty_box: 1 }),
        10,
      ),
      '[##xx~~rp..]',
    );
    // One device retrying and one held of 10,000, the rest succeeded: both still drawn, the bar still 30 wide.
    assert.equal(
      progressBar(counts({ total: 10_000, succeeded: 9_998, retrying: 1, penalty_box: 1 })),
      `[${'#'.repeat(28)}rp]`,
    );
  });

  test('a plain group target set is a target deployment: printed, watched (0, then 6 once superseded), listed, not paced', {
    timeout: 180_000,
  }, async () => {
    await simulate('plain', 3);
    const set = await cli('target', 'set', '2.0.0', '--group', 'plain');
    assert.equal(set.code, 0, set.err);
    const m = /^deployment ([0-9a-f-]{36}); watch it: fleethub deployments watch \1$/m.exec(set.out);
    assert.ok(m, set.out);
    const id = m[1]!;
    const watched = await cli('deployments', 'watch', id, '--timeout', '150');
    assert.equal(watched.code, 0, watched.err);
    assert.match(watched.err, /completed: 3 of 3 device\(s\) succeeded, 0 failed/);

    const listed = await cli('deployments', 'list', '--kind', 'target');
    assert.equal(listed.code, 0, listed.err);
    assert.match(listed.out, /^ID\s+KIND\s+NAME/m);
    assert.match(listed.out, new RegExp(`^${id}\\s+target\\s+target plain\\s+2\\.0\\.0\\s+completed`, 'm'));
    assert.equal((await cli('deployments', 'list', '--kind', 'bogus')).code, 2);

    const one = await cli('status', '--deployment', id);
    assert.equal(one.code, 0, one.err);
    assert.match(one.out, /^ {2}total {4}\[#{30}\] {2}3\/3 told, 3 succeeded, 0 failed/m);
    const group = await cli('status', '--group', 'plain');
    assert.equal(group.code, 0, group.err);
    assert.match(
      group.out,
      new RegExp(`^DEPLOYMENT {3}${id} \\(2\\.0\\.0, completed\\): 3/3 succeeded, 0 failed`, 'm'),
    );

    // A newer target: the old deployment ended long ago (completed); the new one is superseded by a clear.
    const next = await cli('target', 'set', '3.0.0', '--group', 'plain', '--json');
    assert.equal(next.code, 0, next.err);
    const nextId = (JSON.parse(next.out) as { deployment_id: string }).deployment_id;
    const paused = await cli('deployments', 'pause', nextId);
    assert.equal(paused.code, 1);
    assert.match(paused.err, /a plain target is not paced: set another target or clear it/);
    assert.equal((await cli('target', 'clear', '--group', 'plain')).code, 0);
    const superseded = await cli('deployments', 'watch', nextId, '--timeout', '30');
    assert.equal(superseded.code, 6, superseded.err);
    assert.match(superseded.err, /^superseded/m);
  });

  test('create: flag errors exit 2 before any request; the server refusing a value names the flag', async () => {
    for (const [flags, message] of [
      [['--stage', 'half'], /--stage takes a number of devices \(10\), a percentage \(50%\) or rest/],
      [['--rate', '1/h'], /--rate 1\/h is 0\.0166.* device\(s\) a minute/],
      [['--stage', 'rest', '--stage', '10'], /only the last stage can be `rest`/],
      [['--min-finished', '3'], /--min-finished and --on-error go with --error-threshold/],
      [['--soak', '5 min'], /--soak takes seconds/],
      [['--rate', 'exp:0:2:notified'], /--rate exp:BASE:FACTOR:CRITERION\[:EVERY\] takes a whole BASE/],
      [['--rate', 'exp:5:1:succeeded'], /a FACTOR from 1\.1 to 5/],
      [['--rate', 'exp:5:2:downloaded'], /notified or succeeded/],
      [['--rate', '30/min', '--max-rate', '60/min'], /--max-rate goes with an exponential --rate/],
      [['--max-rate', '60/min'], /--max-rate goes with --rate exp/],
      [['--retry-backoff', '30s'], /--retry-backoff and --penalty go with --retries/],
      [['--retries', '2', '--penalty', '3/1h'], /--penalty takes FAILURES\/WINDOW\/HOLD, e\.g\. 3\/1h\/30m/],
    ] as const) {
      const res = await cli('deployments', 'create', '2.0.0', '--group', 'good', ...flags);
      assert.equal(res.code, 2, `${flags.join(' ')}: ${res.err}`);
      assert.match(res.err, message);
    }
    const refused = await cli(
      'deployments',
      'create',
      '2.0.0',
      '--group',
      'good',
      '--canary',
      '2',
      '--stage',
      'rest',
      '--error-threshold',
      '150%',
    );
    assert.equal(refused.code, 1);
    assert.match(
      refused.err,
      /the server refused the deployment:\n {2}--error-threshold \(the canary\): must be <= 100/,
    );
    // The server checks that the penalty box fits the retries.
    const penalty = await cli(
      'deployments',
      'create',
      '2.0.0',
      '--group',
      'good',
      '--retries',
      '1',
      '--penalty',
      '2/1h/30m',
    );
    assert.equal(penalty.code, 1);
    assert.match(penalty.err, /penalty\.failures \(2\) must be at most retries \(1\)/);
    const unknown = await cli('deployments', 'show', 'no-such-rollout');
    assert.equal(unknown.code, 1);
    assert.match(unknown.err, /no deployment named "no-such-rollout"/);
  });
});
