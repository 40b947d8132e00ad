/**
 * Property-based fuzzing of every device-facing protocol against the whole server on real
 * sockets: Phoenix V1/V2 frames on the mutual-TLS device socket, GRiSP JSON-RPC, WiFiDogX JSON,
 * keyauth lines, Main Server REST bodies and operator REST bodies. For every input: no 5xx, no
 * crash, no error-level log line (the server's pino output is captured), and a well-behaved
 * device connected alongside still gets its replies and, at the end, its update.
 *
 * Bounded for `npm test` (fixed seed, FUZZ_RUNS runs per protocol); `npm run bench -- --fuzz`
 * runs it with many more. A failure names the seed and path: FUZZ_SEED=… FUZZ_RUNS=… replays it.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import type { Channel, Socket } from 'phoenix';
import { createLogger } from '../../server/log.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, nextEvent, openSocket, pushAndWait, RawClient } from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { field, frameText, fuzzParameters, jsonValue, messageOf, nastyNumber, nastyString } from './arbitraries.ts';

const RUNS = fuzzParameters(30);
const GOOD_FIRMWARE = '5e1f7a52-8a3c-4b7e-9d61-0c2f4e8b9a10';
const UUID = fc.uuid();

interface LogLine {
  level: number;
  msg?: string;
  err?: { message?: string; type?: string };
  [key: string]: unknown;
}

let server: TestServer;
const logs: LogLine[] = [];
let good: { socket: Socket; channel: Channel; deviceId: string };

before(async () => {
  const log = createLogger({
    level: 'info',
    destination: {
      write(line: string) {
        logs.push(JSON.parse(line) as LogLine);
      },
    },
  });
  // The production settings: WiFiDogX gateways need their credential once approved.
  server = await startTestServer({}, { log });
  const socket = await openSocket(`${server.deviceUrl.replace('https:', 'wss:')}/socket`, {
    tls: await deviceTlsOptions(await deviceCert('fuzz-bystander')),
  });
  const channel = socket.channel(`device:${GOOD_FIRMWARE}`, { version: '1.0.0' });
  await joinChannel(channel);
  const row = await server.database.db
    .selectFrom('devices')
    .select('id')
    .where('identifier', '=', 'fuzz-bystander')
    .executeTakeFirstOrThrow();
  good = { socket, channel, deviceId: row.id };
});

after(async () => {
  await disconnectSocket(good.socket);
  await server.close();
});

/** Error-level lines logged since `mark` (a client's input must never cause one). */
function errorLinesSince(mark: number): string[] {
  return logs
    .slice(mark)
    .filter((l) => l.level >= 50)
    .map((l) => `${l.msg ?? ''}${l.err ? `: ${l.err.type ?? ''} ${l.err.message ?? ''}` : ''}`);
}

/** Findings of a FUZZ_REPORT=1 run, which records every failing input instead of stopping at the first. */
const findings = new Map<string, { count: number; example: string }>();

/** Wraps a property body: a fresh log mark per input, then the log must hold no error line for it. */
function checked<A extends unknown[]>(
  protocol: string,
  run: (...input: A) => Promise<void>,
): (...input: A) => Promise<void> {
  return async (...input) => {
    const mark = logs.length;
    try {
      await run(...input);
      // Work the input started (a close, a write) may log a moment after the answer.
      await new Promise((r) => setTimeout(r, 5));
      const errors = errorLinesSince(mark);
      assert.equal(errors.length, 0, `a client input caused error-level log lines: ${errors.join(' | ')}`);
    } catch (err) {
      if (!process.env.FUZZ_REPORT) throw err;
      const key = `${protocol}: ${shorten((err as Error).message, 400)}`;
      const seen = findings.get(key) ?? { count: 0, example: shorten(fc.stringify(input), 600) };
      seen.count++;
      findings.set(key, seen);
    }
  };
}

/** fast-check's report with long runs of one character (oversized values) folded. */
function report<T>(details: fc.RunDetails<T>): void {
  if (details.failed) throw new Error(shorten(fc.defaultReportMessage(details) ?? 'property failed', 4000));
}

function shorten(text: string, max: number): string {
  const folded = text.replace(/(.)\1{40,}/gs, (run, c: string) => `${c}…×${run.length}`);
  return folded.length > max ? `${folded.slice(0, max)}…` : folded;
}

/** Fuzz parameters for a property over `T`. */
const params = <T>(): fc.Parameters<T> => ({ ...RUNS, reporter: report<T> });

/** The bystander device still gets a reply on its channel. */
async function bystanderAnswered(): Promise<void> {
  const outcome = await pushAndWait(good.channel, 'fuzz_bystander_ping', {}, 5000);
  assert.notEqual(outcome.status, 'timeout', 'the well-behaved device got no reply');
  assert.ok(good.socket.isConnected(), 'the well-behaved device was disconnected');
}

const wsUrl = (path: string) => `${server.deviceUrl.replace('https:', 'wss:')}${path}`;

/** Waits a little for what a connection answers; never longer than `ms`. */
const settle = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Sends each text frame while the socket is open, lets the server answer, then closes: never with 1011. */
async function sendFrames(client: RawClient, texts: string[]): Promise<void> {
  try {
    for (const text of texts) if (client.closeCode === undefined) client.send(text);
    await settle(30);
    assert.notEqual(client.closeCode, 1011, 'the server closed with an internal error');
  } finally {
    await client.close();
  }
}

describe(`fuzzing the device-facing protocols (${DATABASE_KIND})`, () => {
  test('Phoenix V1 and V2 JSON frames on the device socket', async () => {
    const v2 = fc.tuple(
      field(fc.constant('1')),
      field(fc.integer({ min: 1, max: 9 }).map(String)),
      field(fc.constantFrom('phoenix', `device:${GOOD_FIRMWARE}`, `device:${randomUUID()}`, 'group:x')),
      field(
        fc.constantFrom(
          'phx_join',
          'phx_leave',
          'heartbeat',
          'firmware_update_progress',
          'firmware_update_begin',
          'firmware_update_error',
        ),
      ),
      field(fc.object()),
    );
    const v1 = messageOf({
      topic: field(fc.constantFrom('phoenix', `device:${GOOD_FIRMWARE}`)),
      event: field(fc.constantFrom('phx_join', 'heartbeat', 'firmware_update_finish')),
      payload: jsonValue,
      ref: field(fc.string()),
      join_ref: field(fc.string()),
    });
    const frames = fc.array(frameText(fc.oneof(v2, v1)), { minLength: 1, maxLength: 4 });
    const vsn = fc.constantFrom('2.0.0', '1.0.0');
    const tls = await deviceTlsOptions(await deviceCert('fuzz-phoenix'));
    await fc.assert(
      fc.asyncProperty(
        vsn,
        frames,
        checked('phoenix', async (version: string, texts: string[]) => {
          await sendFrames(await RawClient.connect(wsUrl(`/socket/websocket?vsn=${version}`), tls), texts);
        }),
      ),
      params(),
    );
    await bystanderAnswered();
  });

  test('GRiSP JSON-RPC on /grisp-connect/ws', async () => {
    const id = field(fc.oneof(fc.integer(), fc.string()));
    const request = messageOf({
      jsonrpc: field(fc.constant('2.0')),
      id,
      method: field(fc.constantFrom('update', 'log.sync', 'ping', 'device_linking_token', 'get')),
      params: field(
        messageOf({
          type: field(fc.constantFrom('software_update_event', 'system_info')),
          event: field(fc.constantFrom('progress', 'warning', 'error', 'done')),
          percentage: field(nastyNumber),
          reason: nastyString,
          token: nastyString,
        }),
      ),
    });
    const response = messageOf({
      jsonrpc: field(fc.constant('2.0')),
      id,
      result: jsonValue,
      error: field(messageOf({ code: field(fc.integer()), message: nastyString })),
    });
    const systemInfo = messageOf({
      relname: field(nastyString),
      relvsn: field(nastyString),
      update_enabled: field(fc.boolean()),
      boot_source: jsonValue,
      update_status: field(fc.constantFrom('ready', 'updating', 'failed', 'updated')),
      action_required: field(fc.constantFrom('validate', 'reboot', 'remove_sdcard_and_reboot')),
      serial: field(nastyString),
    });
    const messages = fc.array(
      frameText(fc.oneof(request, response, fc.array(fc.oneof(request, response), { maxLength: 3 }))),
      { maxLength: 4 },
    );
    const tls = await deviceTlsOptions(await deviceCert('GRiSP2 device fuzz-0001'));
    await fc.assert(
      fc.asyncProperty(
        systemInfo,
        messages,
        checked('grisp', async (info: Record<string, unknown>, texts: string[]) => {
          const board = await RawClient.connect(wsUrl('/grisp-connect/ws'), tls, { protocols: ['grisp-io-v1'] });
          // The server asks for system_info first: answer it with fuzzed content.
          const ask = await board
            .waitFrame((f) => !f.binary && (f.json as { method?: string })?.method === 'get', 3000)
            .catch(() => undefined);
          const askId = (ask && !ask.binary ? (ask.json as { id?: unknown }).id : undefined) ?? 1;
          await sendFrames(board, [JSON.stringify({ jsonrpc: '2.0', id: askId, result: info }), ...texts]);
        }),
      ),
      params(),
    );
    await bystanderAnswered();
  });

  test('WiFiDogX JSON on /ws/wifidogx', async () => {
    const type = field(
      fc.constantFrom(
        'connect',
        'heartbeat',
        'firmware_info_response',
        'firmware_info_error',
        'firmware_upgrade_response',
        'firmware_upgrade_error',
        'kickoff_response',
        'kickoff_error',
      ),
    );
    const gateway = messageOf({
      gw_id: field(nastyString),
      gw_channel: field(nastyString),
      auth_mode: field(fc.integer()),
      gw_address_v4: field(nastyString),
    });
    const message = messageOf({
      type,
      op: type,
      device_id: field(fc.constantFrom('fuzz-gw-1', 'fuzz-gw-2')),
      req_id: field(fc.integer()),
      gateway: field(fc.array(gateway, { maxLength: 3 })),
      data: field(
        messageOf({ DISTRIB_RELEASE: field(nastyString), DISTRIB_REVISION: field(nastyString), error: nastyString }),
      ),
      device_info: jsonValue,
    });
    const messages = fc.array(frameText(message), { minLength: 1, maxLength: 4 });
    // No credential, or any string as one (percent-encoded into the upgrade path).
    const credential = fc.option(fc.oneof(fc.base64String({ maxLength: 60 }), nastyString).map(percentEncoded), {
      nil: undefined,
    });
    const url = `${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`;
    await fc.assert(
      fc.asyncProperty(
        credential,
        messages,
        checked('wifidogx', async (secret: string | undefined, texts: string[]) => {
          const gw = await RawClient.connect(secret === undefined ? url : `${url}?credential=${secret}`, {}).catch(
            (err: { status?: number }) => {
              assert.ok((err.status ?? 0) < 500, `the upgrade answered ${err.status}`);
              return undefined;
            },
          );
          if (gw) await sendFrames(gw, texts);
        }),
      ),
      params(),
    );
    await bystanderAnswered();
  });

  test('keyauth lines on the TCP listener', async () => {
    const hello = messageOf({
      code: field(fc.constantFrom(101, 102, 103)),
      data: field(
        messageOf({
          key: field(fc.constantFrom('-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----', '')),
          name: nastyString,
        }),
      ),
    });
    const envelope = messageOf({
      enc: field(
        messageOf({
          key: field(fc.base64String()),
          iv: field(fc.base64String()),
          ct: field(fc.base64String()),
          tag: field(fc.base64String()),
        }),
      ),
    });
    const request = messageOf({
      action: field(fc.constantFrom('status', 'check_update', 'report', 'heartbeat')),
      data: jsonValue,
      id: jsonValue,
    });
    const lines = fc.array(frameText(fc.oneof(hello, envelope, request)), { minLength: 1, maxLength: 4 });
    await fc.assert(
      fc.asyncProperty(
        lines,
        checked('keyauth', async (texts: string[]) => {
          const socket = net.connect({ host: '127.0.0.1', port: server.keyauth!.port });
          socket.on('error', () => undefined);
          const answers: string[] = [];
          let buffered = '';
          socket.setEncoding('utf8').on('data', (chunk: string) => {
            buffered += chunk;
            const parts = buffered.split('\n');
            buffered = parts.pop()!;
            answers.push(...parts);
          });
          const closed = new Promise<void>((r) => socket.once('close', () => r()));
          await new Promise<void>((r, reject) => socket.once('connect', r).once('error', reject));
          for (const text of texts) if (!socket.destroyed) socket.write(`${text.replace(/\n/g, ' ')}\n`);
          await Promise.race([closed, settle(40)]);
          for (const answer of answers) {
            const parsed = JSON.parse(answer) as { code?: number };
            assert.notEqual(parsed.code, 500, `the server answered 500: ${answer}`);
          }
          socket.destroy();
          await closed;
        }),
      ),
      params(),
    );
    await bystanderAnswered();
  });

  test('Main Server REST bodies', async () => {
    const extension = messageOf({
      name: field(nastyString),
      version: field(fc.constantFrom('1.0.0', '2.0.0-rc.1')),
      extension_id: field(fc.integer()),
    });
    const body = messageOf({
      device_id: field(fc.constantFrom('fuzz-raspi-1', 'fuzz-raspi-2')),
      name: field(nastyString),
      ip: field(nastyString),
      extensions: field(fc.array(extension, { maxLength: 3 })),
      claim_token: field(nastyString),
      status: field(fc.constantFrom('in_progress', 'success', 'failed', 'rolled_back')),
      version: field(nastyString),
      extension_id: field(fc.integer()),
      new_version: field(nastyString),
      progress: field(nastyNumber),
      error: nastyString,
    });
    const route = fc.constantFrom('register-device', 'heartbeat', 'update-status', 'schedule-update', 'deploy-update');
    const auth = fc.constantFrom<'none' | 'garbage' | 'operator'>('none', 'garbage', 'operator');
    const get = fc.tuple(
      fc.constantFrom('updates', 'download-update', 'devices'),
      fc.dictionary(fc.constantFrom('device_id', 'extension_id', 'version', 'package_id'), nastyString, { maxKeys: 3 }),
    );
    await fc.assert(
      fc.asyncProperty(
        route,
        auth,
        frameText(body),
        get,
        checked(
          'main-server',
          async (path: string, who: string, text: string, [getPath, query]: [string, Record<string, string>]) => {
            const headers: Record<string, string> = { 'content-type': 'application/json' };
            if (who === 'garbage') headers.authorization = 'Bearer fhd_\u00e9garbage';
            if (who === 'operator') headers.authorization = `Bearer ${server.adminToken}`;
            const posted = await fetch(`${server.apiUrl}/api/main-server/${path}`, {
              method: 'POST',
              headers: latin1(headers),
              body: text,
            });
            await posted.arrayBuffer();
            assert.ok(posted.status < 500, `POST ${path} answered ${posted.status}`);
            const read = await fetch(`${server.apiUrl}/api/main-server/${getPath}?${new URLSearchParams(query)}`, {
              headers: latin1(headers),
            });
            await read.arrayBuffer();
            assert.ok(read.status < 500, `GET ${getPath} answered ${read.status}`);
          },
        ),
      ),
      params(),
    );
    await bystanderAnswered();
  });

  test('operator REST bodies on every route that takes one', async () => {
    const doc = (await (await fetch(`${server.apiUrl}/api/docs/json`)).json()) as {
      paths: Record<string, Record<string, unknown>>;
    };
    const routes = Object.entries(doc.paths).flatMap(([path, ops]) =>
      Object.keys(ops)
        .filter((m) => ['post', 'put', 'patch'].includes(m))
        .map((method) => ({ method, path })),
    );
    assert.ok(routes.length > 20, `the OpenAPI document lists the routes (${routes.length})`);
    // Never the bystander's ids: fuzzing must not revoke or retarget the device it watches.
    // Path segments as their UTF-8 bytes percent-encoded (a lone surrogate goes as U+FFFD), or raw
    // escapes of bytes that are no UTF-8 at all (an encoded surrogate, an overlong NUL, 0xFF).
    const segment = fc.oneof(
      { weight: 5, arbitrary: nastyString.map(percentEncoded) },
      { weight: 1, arbitrary: fc.constantFrom('%ED%A0%80', '%C0%80', '%FF', '%00', '..', '%2e%2e%2f') },
    );
    const param = (name: string) =>
      name === 'org' ? fc.oneof(fc.constant(server.orgId), segment) : fc.oneof(UUID, segment);
    const call = fc.constantFrom(...routes).chain((route) =>
      fc.record({
        route: fc.constant(route),
        params: fc.record(
          Object.fromEntries([...route.path.matchAll(/\{(\w+)\}/g)].map(([, name]) => [name!, param(name!)])),
        ),
        body: frameText(
          messageOf({
            name: field(nastyString),
            identifier: field(nastyString),
            product: field(nastyString),
            version: field(nastyString),
            firmware_id: field(UUID),
            devices: field(fc.array(UUID, { maxLength: 3 })),
            description: field(nastyString),
            tags: field(fc.array(nastyString, { maxLength: 3 })),
            priority: field(fc.integer()),
            pem: field(nastyString),
            email: field(nastyString),
            role: field(fc.constantFrom('viewer', 'operator', 'admin')),
            url: field(nastyString),
          }),
        ),
      }),
    );
    await fc.assert(
      fc.asyncProperty(
        call,
        checked(
          'operator-rest',
          async ({
            route,
            params,
            body,
          }: {
            route: { method: string; path: string };
            params: Record<string, string>;
            body: string;
          }) => {
            const url = route.path.replace(/\{(\w+)\}/g, (_, name: string) => params[name]!);
            const res = await fetch(`${server.apiUrl}${url}`, {
              method: route.method.toUpperCase(),
              headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
              body,
            });
            const text = await res.text();
            assert.ok(
              res.status < 500,
              `${route.method.toUpperCase()} ${route.path} answered ${res.status}: ${text.slice(0, 300)}`,
            );
          },
        ),
      ),
      params(),
    );
    await bystanderAnswered();
  });

  test('after all of it, the well-behaved device still gets its update', async () => {
    const upload = await fetch(
      `${server.apiUrl}/api/v1/firmware?org=${server.orgId}&product=${server.productId}&version=1.1.0`,
      {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
        body: new Uint8Array(4096).fill(1),
      },
    );
    assert.equal(upload.status, 201, await upload.clone().text());
    const firmware = (await upload.json()) as { id: string };
    const pushed = nextEvent(good.channel, 'firmware_update', 10_000);
    await server.call('PUT', `/api/v1/orgs/${server.orgId}/devices/${good.deviceId}/target`, {
      firmware_id: firmware.id,
    });
    const update = await pushed;
    assert.equal(update.firmware_uuid, firmware.id);
    assert.equal(update.version, '1.1.0');
  });

  after(() => {
    if (!process.env.FUZZ_REPORT) return;
    const lines = [...findings]
      .sort((a, b) => b[1].count - a[1].count)
      .map(([key, f]) => `${f.count}× ${key}\n    e.g. ${f.example}`);
    console.log(
      `fuzz findings (${findings.size} kinds, seed ${RUNS.seed}, ${RUNS.numRuns} runs per protocol):\n${lines.join('\n')}`,
    );
    assert.equal(findings.size, 0, `${findings.size} kinds of failing input (listed above)`);
  });
});

/** Every byte of the string's UTF-8 outside the unreserved set as %XX. */
function percentEncoded(text: string): string {
  return [...Buffer.from(text, 'utf8')]
    .map((b) =>
      /[A-Za-z0-9._~-]/.test(String.fromCharCode(b))
        ? String.fromCharCode(b)
        : `%${b.toString(16).toUpperCase().padStart(2, '0')}`,
    )
    .join('');
}

/** Headers must be ByteStrings for fetch; anything else is sent as its UTF-8 bytes read as Latin-1. */
function latin1(headers: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(headers).map(([k, v]) => [k, Buffer.from(v, 'utf8').toString('latin1')]));
}
