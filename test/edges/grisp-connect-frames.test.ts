/**
 * The GRiSP edge against the frames grisp_connect itself sends (not the simulator's): a scripted
 * board on a real mutual-TLS WebSocket answers the server's requests with the exact JSON of
 * grisp_connect_api / grisp_connect_log / grisp_connect_updater_progress, when the test says so.
 * These are what running grisp_connect unmodified against fleethub showed.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';
import { BOARD_TEXT_MAX } from '../../server/edges/grisp/connection.ts';
import { grispEdgeOf } from '../../server/edges/grisp/index.ts';
import { createLogger } from '../../server/log.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { attemptsOf, uploadGrispPackage } from '../helpers/grisp.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { type LogLine, startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';

/** A JSON-RPC frame as the board reads and writes it. */
interface Frame {
  [field: string]: unknown;
  method?: string;
  params?: { [field: string]: unknown; type?: string };
}

/** The GRiSP state the API shows for a board. */
interface GrispState {
  [field: string]: unknown;
  system_info: Record<string, unknown>;
}

/** system_info as grisp_connect_updater answers it on a board ready for an update. */
function systemInfo(relvsn: string | null, o: Frame = {}): Frame {
  return {
    relname: 'fleethub_board',
    relvsn,
    update_enabled: true,
    boot_source: { type: 'system', id: 0 },
    update_status: 'ready',
    update_message: 'Device ready for update',
    hardware: { platform: 'grisp2', version: '1', serial: 'hw-0001', batch: 1 },
    ...o,
  };
}

/** The event grisp_connect_logger_bin puts first in a batch after its buffer dropped `count` events. */
function dropEvent(count: number): unknown[] {
  return [
    null,
    {
      level: 'warning',
      meta: {
        file: '/home/grisp/_build/default/lib/grisp_connect/src/grisp_connect_logger_bin.erl',
        line: 306,
        mfa: ['grisp_connect_logger_bin', 'drop_event', 1],
        time: 1733097600123456,
      },
      msg: { count, event: 'log_drop' },
    },
  ];
}

function logEvent(seq: number, msg: string): unknown[] {
  return [seq, { level: 'notice', meta: { file: null, mfa: null, time: 1733097600200000 + seq }, msg }];
}

/**
 * A board speaking grisp-io-v1 frame by frame. `answer` decides the reply to each server request
 * (undefined: no reply now; the test may `reply` later). Everything the server sent is in `received`.
 */
class ScriptedBoard {
  readonly received: Frame[] = [];
  ws!: WebSocket;
  constructor(
    readonly serial: string,
    public answer: (request: Frame) => Frame | undefined,
  ) {}

  async connect(url: string): Promise<void> {
    const tls = await deviceTlsOptions(await deviceCert(`GRiSP2 device ${this.serial}`));
    this.ws = new WebSocket(url, ['grisp-io-v1'], { cert: tls.cert, key: tls.key, ca: tls.ca });
    this.ws.on('message', (data) => {
      const frame = JSON.parse(data.toString()) as Frame;
      this.received.push(frame);
      if (typeof frame.method === 'string' && 'id' in frame) {
        const reply = this.answer(frame);
        if (reply) this.reply(frame, reply);
      }
    });
    await new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
    });
  }

  reply(request: Frame, body: Frame): void {
    this.send({ jsonrpc: '2.0', id: request.id, ...body });
  }

  send(frame: Frame): void {
    this.ws.send(JSON.stringify(frame));
  }

  /** The server's requests (and notifications) for `method` with params.type `type`. */
  sent(method: string, type?: string): Frame[] {
    return this.received.filter((f) => f.method === method && (type === undefined || f.params?.type === type));
  }

  close(): void {
    this.ws.terminate();
  }
}

let server: TestServer;
const boards: ScriptedBoard[] = [];
const logLines: LogLine[] = [];

async function scriptedBoard(answer: (request: Frame) => Frame | undefined): Promise<ScriptedBoard> {
  const b = new ScriptedBoard(`f${process.pid}-${randomBytes(3).toString('hex')}`, answer);
  boards.push(b);
  await b.connect(`${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`);
  return b;
}

async function deviceOf(b: ScriptedBoard) {
  return until(
    () =>
      server.database.db
        .selectFrom('devices')
        .selectAll()
        .where('identifier', '=', `GRiSP2 device ${b.serial}`)
        .executeTakeFirst(),
    'the board registered',
  );
}

async function onlineDevice(b: ScriptedBoard) {
  const { id } = await deviceOf(b);
  return until(async () => {
    const d = await server.database.db.selectFrom('devices').selectAll().where('id', '=', id).executeTakeFirst();
    return d?.connection_status === 'online' ? d : undefined;
  }, 'the board online');
}

async function grispState(deviceId: string) {
  return server.call<GrispState>('GET', `/api/v1/orgs/${server.orgId}/devices/${deviceId}/grisp`);
}

async function newestAttempt(deviceId: string) {
  return (await attemptsOf(server, deviceId))[0];
}

async function uploadPackage(version: string): Promise<string> {
  const { status, body } = await uploadGrispPackage(server, version, [randomBytes(2000)]);
  assert.equal(status, 201);
  return body.id;
}

async function target(deviceId: string, firmwareId: string): Promise<void> {
  await server.call('PUT', `/api/v1/orgs/${server.orgId}/devices/${deviceId}/target`, { firmware_id: firmwareId });
}

const EMPTY_LOGS = { result: { dropped: 0, events: [] } };

describe(`GRiSP edge with grisp_connect's frames (${DATABASE_KIND})`, () => {
  before(async () => {
    const log = createLogger({
      level: 'info',
      destination: { write: (line: string) => void logLines.push(JSON.parse(line)) },
    });
    server = await startTestServer({}, { log });
    grispEdgeOf(server.deviceListener.app)!.configure({
      timings: { logIntervalMs: 150, startUpdateTimeoutMs: 200 },
    });
  });
  after(async () => {
    for (const b of boards) b.close();
    await server.close();
  });

  it('accepts a log batch led by the null-seq log_drop event, acknowledges it and keeps collecting', async () => {
    const batches: Frame[] = [
      {
        result: {
          dropped: 3,
          events: [dropEvent(3), logEvent(41, 'Connected to grisp.io'), logEvent(42, 'Update progress: 10%')],
        },
      },
      { result: { dropped: 0, events: [logEvent(43, 'after the overflow')] } },
      // The buffer overflowed again and holds nothing newer: only the drop event.
      { result: { dropped: 2, events: [dropEvent(2)] } },
    ];
    const b = await scriptedBoard((r) => {
      if (r.method === 'get') return { result: systemInfo('1.0.0') };
      if (r.method === 'log.get') return batches.shift() ?? EMPTY_LOGS;
      return { result: 'ok' };
    });
    const device = await onlineDevice(b);
    const syncs = await until(() => {
      const s = b.sent('log.sync');
      return s.length >= 3 ? s : undefined;
    }, 'three log.sync notifications');
    assert.deepEqual(
      syncs.map((s) => s.params),
      [
        { seq: 42, dropped: 3 },
        { seq: 43, dropped: 0 },
        { seq: 43, dropped: 2 },
      ],
    );
    assert.ok(
      syncs.every((s) => !('id' in s)),
      'log.sync is a notification',
    );
    const { items } = await server.call<{ items: Frame[] }>(
      'GET',
      `/api/v1/orgs/${server.orgId}/devices/${device.id}/logs`,
    );
    assert.deepEqual(
      items.map((e) => [e.seq, e.level, e.msg]),
      [
        [null, 'warning', { count: 2, event: 'log_drop' }],
        [43, 'notice', 'after the overflow'],
        [42, 'notice', 'Update progress: 10%'],
        [41, 'notice', 'Connected to grisp.io'],
        [null, 'warning', { count: 3, event: 'log_drop' }],
      ],
    );
    const state = await grispState(device.id);
    assert.equal(state.log_seq, 43);
    assert.equal(state.log_dropped, 5);
    assert.ok(logLines.some((l) => l.msg.includes('dropped log events') && l.dropped === 3));
  });

  it('keeps the attempt open past the start_update timeout: the late "ok", progress and done count', async () => {
    const firmwareId = await uploadPackage('2.0.0');
    let held: Frame | undefined;
    const b = await scriptedBoard((r) => {
      if (r.method === 'get') return { result: systemInfo('1.0.0') };
      if (r.method === 'log.get') return EMPTY_LOGS;
      if (r.params?.type === 'start_update') {
        held = r; // fetching the manifest over a slow link
        return undefined;
      }
      return { result: 'ok' };
    });
    const device = await onlineDevice(b);
    await target(device.id, firmwareId);
    await until(
      () =>
        logLines.some(
          (l) => l.device_id === device.id && l.msg.startsWith('the board has not answered start_update yet'),
        ),
      'the start_update timeout',
    );
    assert.ok(held);
    assert.equal((await newestAttempt(device.id))!.state, 'sent');

    b.reply(held, { result: 'ok' });
    for (const percentage of [0, 49, 99])
      b.send({
        jsonrpc: '2.0',
        method: 'update',
        params: { type: 'software_update_event', event: 'progress', percentage },
      });
    b.send({ jsonrpc: '2.0', method: 'update', params: { type: 'software_update_event', event: 'done' } });

    const finished = await until(async () => {
      const a = await newestAttempt(device.id);
      return a?.state === 'finished' ? a : undefined;
    }, 'the attempt finished');
    assert.equal(finished.firmware_id, firmwareId);
    assert.equal(finished.percent, 100);
    assert.ok(finished.begun_at);
    await until(() => b.sent('post', 'reboot').length === 1, 'post reboot after done');
    assert.equal(
      logLines.some((l) => l.device_id === device.id && l.msg === 'update event without an update in progress'),
      false,
    );
  });

  for (const [name, relvsn, recorded] of [
    ['null', null, null],
    ['not a semantic version', 'dev-2024.12.02', 'dev-2024.12.02'],
  ] as const) {
    it(`shows a board whose relvsn is ${name} online, its version recorded as reported`, async () => {
      const b = await scriptedBoard((r) => {
        if (r.method === 'get') return { result: systemInfo(relvsn) };
        if (r.method === 'log.get') return EMPTY_LOGS;
        return { result: 'ok' };
      });
      const device = await onlineDevice(b);
      assert.equal(device.firmware_version, recorded);
      assert.equal(device.firmware_uuid, null);
      const state = await grispState(device.id);
      assert.equal(state.relvsn, relvsn);
      const listed = await server.call<Frame>('GET', `/api/v1/orgs/${server.orgId}/devices/${device.id}`);
      assert.equal(listed.connection_status, 'online');
      assert.equal(listed.firmware_version, recorded);
      assert.equal(
        logLines.some((l) => l.device_id === device.id && JSON.stringify(l).includes('semantic version')),
        false,
      );
    });
  }

  it('stores a long multi-line JSON-RPC error from the board on one bounded line', async () => {
    const firmwareId = await uploadPackage('2.1.0');
    // grisp_connect_api answers an updater error it has no code for with internal_error and the
    // reason printed by io_lib:format("~p"): Erlang's pretty printer breaks and indents it.
    const reason = [
      '{http_error,503,',
      ...Array.from({ length: 40 }, (_, i) => `             [{<<"retry-after">>,<<"${i}">>},`),
      '              {<<"server">>,<<"fleethub">>}]}',
    ].join('\n');
    const b = await scriptedBoard((r) => {
      if (r.method === 'get') return { result: systemInfo('1.0.0') };
      if (r.method === 'log.get') return EMPTY_LOGS;
      if (r.params?.type === 'start_update') return { error: { code: -32603, message: reason } };
      return { result: 'ok' };
    });
    const device = await onlineDevice(b);
    await target(device.id, firmwareId);
    const failed = await until(async () => {
      const a = await newestAttempt(device.id);
      return a?.state === 'failed' ? a : undefined;
    }, 'the attempt failed');
    const [error] = failed.errors as string[];
    assert.ok(reason.length > BOARD_TEXT_MAX);
    assert.ok(error!.length <= BOARD_TEXT_MAX, `${error!.length} characters`);
    assert.doesNotMatch(error!, /[\n\r\t]| {2}/);
    assert.match(error!, /^start_update: \{http_error,503, \[\{<<"retry-after">>,<<"0">>\}, /);
    assert.ok(error!.endsWith('…'));
  });

  it('reads system_info again after validate, so the board no longer shows validation required', async () => {
    let validated = false;
    const b = await scriptedBoard((r) => {
      if (r.method === 'log.get') return EMPTY_LOGS;
      if (r.method === 'get')
        return {
          result: validated
            ? systemInfo('2.0.0')
            : systemInfo('2.0.0', {
                update_status: 'updated',
                update_message: 'Device updated, validation required',
                action_required: 'validate',
                boot_source: { type: 'system', id: 1 },
              }),
        };
      if (r.params?.type === 'validate') {
        validated = true;
        return { result: 'ok' };
      }
      return { result: 'ok' };
    });
    const device = await onlineDevice(b);
    await until(() => b.sent('post', 'validate').length === 1, 'post validate');
    const state = await until(async () => {
      const s = await grispState(device.id);
      return s.update_status === 'ready' ? s : undefined;
    }, 'the board ready again');
    assert.equal(state.action_required, null);
    assert.equal(state.update_message, 'Device ready for update');
    assert.equal(state.system_info.action_required, undefined);
    const order = b.received.filter((f) => f.method === 'get' || f.params?.type === 'validate');
    assert.deepEqual(
      order.map((f) => f.params?.type),
      ['system_info', 'validate', 'system_info'],
    );
  });
});
