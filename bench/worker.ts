/**
 * A load-generator process (forked by bench/run.ts): holds thousands of mutual-TLS client
 * connections from its own loopback source address, in one of three modes:
 *   phoenix — fleethub devices: V2 JSON Phoenix frames, join `device:<uuid>`, then every group
 *             topic the join reply or a `join {channel}` push names; heartbeats every 30 s;
 *   ws      — bare WebSocket connections to the raw ws+TLS floor server;
 *   mqtt    — MQTT 3.1.1 clients subscribed to one topic on Mosquitto.
 * With `autoUpdate` on, a phoenix device answers a `firmware_update` as a device that installs it
 * at once (no download): `firmware_update_begin`, `firmware_update_finish`, then it reconnects
 * and joins `device:<the new firmware_uuid>`, which the server counts as succeeded.
 * Receipt times use the machine-wide monotonic clock so the coordinator can compare processes.
 */
import tls, { type ConnectionOptions, type TLSSocket } from 'node:tls';
import https from 'node:https';
import WebSocket from 'ws';
import { deviceCredentials, benchSerial } from './lib/certs.ts';
import { nowMs, serveRpc, type Request } from './lib/ipc.ts';
import { connectPacket, CONNACK, mqttReader, PUBLISH, publishPacket, SUBACK, subscribePacket } from './lib/mqtt.ts';

type Mode = 'phoenix' | 'ws' | 'mqtt';

const pkiDir = process.env.BENCH_PKI_DIR!;
const localAddress = process.env.BENCH_LOCAL_ADDRESS ?? '127.0.0.1';
const from = Number(process.env.BENCH_FROM);
const to = Number(process.env.BENCH_TO);
const creds = deviceCredentials(pkiDir, from, to);

interface Pending {
  sentAt: number;
  resolve: (reply: { status: string; response: Record<string, unknown>; at: number }) => void;
}

interface Device {
  index: number;
  mode: Mode;
  ws?: WebSocket;
  mqtt?: TLSSocket;
  session?: Buffer;
  open: boolean;
  deviceJoined: boolean;
  groupJoined: boolean;
  ref: number;
  deviceJoinRef: string;
  pending: Map<string, Pending>;
  /** Receipt time of each firmware_update version (phoenix) / of the last broadcast (ws, mqtt). */
  received: Map<string, number>;
  bytesReceived: number;
  firmwareUrl?: string;
  /** The firmware it runs (joins `device:<uuid>`); the run's `firmwareUuid` until it updates. */
  uuid?: string;
  /** Time it rejoined running each version it updated to (autoUpdate). */
  updated: Map<string, number>;
  /** Versions it is installing now (autoUpdate): told, not yet rejoined or given up. */
  installing: Set<string>;
}

const devices = new Map<number, Device>();
let target = { host: '127.0.0.1', port: 0 };
let firmwareUuid = '';
const MQTT_TOPIC = 'bench/fanout';

function tlsOptions(device: Device): ConnectionOptions & { localAddress: string } {
  return {
    cert: creds.certs.get(device.index)!,
    key: creds.keyPem,
    ca: creds.caPem,
    servername: 'localhost',
    localAddress,
    ...(device.session ? { session: device.session } : {}),
  };
}

function withSessionCapture(device: Device) {
  return (options: ConnectionOptions): TLSSocket => {
    const socket = tls.connect({ ...options, path: undefined } as ConnectionOptions);
    socket.on('session', (session: Buffer) => (device.session = session));
    return socket;
  };
}

// ---- phoenix ------------------------------------------------------------------------------

function send(
  device: Device,
  joinRef: string | null,
  topic: string,
  event: string,
  payload: Record<string, unknown>,
): Promise<{ status: string; response: Record<string, unknown>; at: number }> {
  const ref = String(++device.ref);
  const sentAt = nowMs();
  return new Promise((resolve) => {
    device.pending.set(ref, { sentAt, resolve });
    device.ws!.send(JSON.stringify([joinRef, ref, topic, event, payload]));
  });
}

function joinGroup(device: Device, topic: string): void {
  if (device.groupJoined) return;
  const joinRef = String(device.ref + 1);
  void send(device, joinRef, topic, 'phx_join', {}).then((reply) => {
    if (reply.status === 'ok') device.groupJoined = true;
  });
}

function onPhoenixFrame(device: Device, data: Buffer): void {
  const at = nowMs();
  device.bytesReceived += data.length;
  const [, ref, topic, event, payload] = JSON.parse(data.toString('utf8')) as [
    string | null,
    string | null,
    string,
    string,
    Record<string, unknown>,
  ];
  if (event === 'phx_reply' && ref !== null) {
    const pending = device.pending.get(ref);
    if (pending) {
      device.pending.delete(ref);
      pending.resolve({
        status: String(payload.status),
        response: (payload.response ?? {}) as Record<string, unknown>,
        at,
      });
    }
    return;
  }
  if (event === 'firmware_update') {
    const version = String(payload.version);
    if (!device.received.has(version)) device.received.set(version, at);
    device.firmwareUrl = String(payload.url);
    lastFrameBytes = data.length;
    if (
      autoUpdate &&
      !device.updated.has(version) &&
      !device.installing.has(version) &&
      typeof payload.firmware_uuid === 'string'
    )
      void install(device, version, payload.firmware_uuid);
    return;
  }
  if (event === 'join' && typeof payload.channel === 'string' && topic.startsWith('device:'))
    joinGroup(device, payload.channel);
}

let lastFrameBytes = 0;
let autoUpdate = false;
/** Installs that gave up, by the step that failed (begin, finish, reconnect), and the first error. */
const updateFailures = { begin: 0, finish: 0, reconnect: 0 };
let updateFirstError: string | undefined;

/** Installs at once: begin, finish, reconnect on the new firmware (its join confirms the update). */
async function install(device: Device, version: string, uuid: string): Promise<void> {
  device.installing.add(version);
  const topic = `device:${device.uuid ?? firmwareUuid}`;
  let step: keyof typeof updateFailures = 'begin';
  try {
    for (const event of ['firmware_update_begin', 'firmware_update_finish'] as const) {
      step = event === 'firmware_update_begin' ? 'begin' : 'finish';
      const reply = await send(device, device.deviceJoinRef, topic, event, { version });
      if (reply.status !== 'ok') throw new Error(`${event}: ${JSON.stringify(reply.response)}`);
    }
    step = 'reconnect';
    device.uuid = uuid;
    const ws = device.ws!;
    await new Promise<void>((resolve) => {
      ws.once('close', () => resolve());
      ws.close(1000);
    });
    await reconnectPhoenix(device);
    device.updated.set(version, nowMs());
  } catch (err) {
    updateFailures[step]++;
    updateFirstError ??= `${step}: ${(err as Error).message}`;
  } finally {
    device.installing.delete(version);
  }
}

/**
 * Reconnects after an install, retrying a refused or reset handshake a few times (as connect
 * does). At most `reconnectLimit` of this process's devices reconnect at once (0: no bound).
 */
async function reconnectPhoenix(device: Device): Promise<void> {
  await reconnectSlots.acquire();
  try {
    for (let attempt = 1; ; attempt++) {
      try {
        await connectPhoenix(device);
        return;
      } catch (err) {
        device.ws?.terminate();
        if (attempt >= 5) throw err;
        await new Promise((r) => setTimeout(r, 50 * attempt));
      }
    }
  } finally {
    reconnectSlots.release();
  }
}

/** A counting semaphore; a limit of 0 admits everyone. */
class Slots {
  limit = 0;
  #used = 0;
  readonly #waiting: (() => void)[] = [];
  async acquire(): Promise<void> {
    if (this.limit === 0 || this.#used < this.limit) {
      this.#used++;
      return;
    }
    await new Promise<void>((resolve) => this.#waiting.push(resolve));
  }
  release(): void {
    const next = this.#waiting.shift();
    if (next) next();
    else this.#used--;
  }
}
const reconnectSlots = new Slots();

function connectPhoenix(device: Device): Promise<void> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`wss://localhost:${target.port}/socket/websocket?vsn=2.0.0`, {
      ...tlsOptions(device),
      perMessageDeflate: false,
      createConnection: withSessionCapture(device),
    } as WebSocket.ClientOptions);
    device.ws = ws;
    device.pending = new Map();
    device.deviceJoined = false;
    device.groupJoined = false;
    ws.on('error', (err) => {
      if (!device.open) reject(err);
    });
    ws.on('message', (data: Buffer) => onPhoenixFrame(device, data));
    ws.on('close', () => {
      device.open = false;
      device.deviceJoined = false;
      device.groupJoined = false;
      reject(new Error('closed before join'));
    });
    ws.on('open', () => {
      device.open = true;
      device.deviceJoinRef = String(device.ref + 1);
      send(device, device.deviceJoinRef, `device:${device.uuid ?? firmwareUuid}`, 'phx_join', {
        version: '1.0.0',
        platform: 'bench',
        architecture: 'x86_64',
      }).then((reply) => {
        if (reply.status !== 'ok') return reject(new Error(`device join refused: ${JSON.stringify(reply.response)}`));
        device.deviceJoined = true;
        const groups = reply.response.groups;
        if (Array.isArray(groups) && typeof groups[0] === 'string') joinGroup(device, groups[0]);
        resolve();
      });
    });
  });
}

// ---- bare ws (floor) ------------------------------------------------------------------------

function connectWs(device: Device): Promise<void> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`wss://localhost:${target.port}/`, {
      ...tlsOptions(device),
      perMessageDeflate: false,
      createConnection: withSessionCapture(device),
    } as WebSocket.ClientOptions);
    device.ws = ws;
    ws.on('error', reject);
    ws.on('message', (data: Buffer) => {
      const at = nowMs();
      device.bytesReceived += data.length;
      // The floor's frame starts with the broadcast's sequence number.
      device.received.set(String(data.readUInt32BE(0)), at);
    });
    ws.on('close', () => (device.open = false));
    ws.on('open', () => {
      device.open = true;
      resolve();
    });
  });
}

// ---- mqtt ---------------------------------------------------------------------------------

function connectMqtt(device: Device, clientId = benchSerial(device.index)): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ ...tlsOptions(device), host: target.host, port: target.port });
    device.mqtt = socket;
    socket.on('session', (session: Buffer) => (device.session = session));
    socket.on('error', reject);
    socket.on('close', () => {
      device.open = false;
      reject(new Error('mqtt connection closed'));
    });
    socket.once('secureConnect', () => socket.write(connectPacket(clientId)));
    mqttReader(socket, (type, body) => {
      if (type === CONNACK) {
        if (body[1] !== 0) return reject(new Error(`CONNACK refused: ${body[1]}`));
        socket.write(subscribePacket(1, MQTT_TOPIC));
      } else if (type === SUBACK) {
        device.open = true;
        resolve();
      } else if (type === PUBLISH) {
        const at = nowMs();
        const topicLength = body.readUInt16BE(0);
        const payload = body.subarray(2 + topicLength);
        device.bytesReceived += body.length;
        device.received.set(String(payload.readUInt32BE(0)), at);
      }
    });
  });
}

// ---- commands -----------------------------------------------------------------------------

async function connectRange(request: Request): Promise<unknown> {
  const mode = request.mode as Mode;
  target = { host: '127.0.0.1', port: Number(request.port) };
  firmwareUuid = String(request.firmwareUuid ?? '');
  const indexes: number[] = [];
  for (let i = Number(request.from); i < Number(request.to); i++) indexes.push(i);
  const concurrency = Number(request.concurrency ?? 32);
  const resume = request.resume === true;
  let failed = 0;
  let resumed = 0;
  let firstError: string | undefined;
  const started = nowMs();
  const cpuBefore = process.cpuUsage();
  let retries = 0;
  let retryError: string | undefined;
  const latencies: number[] = [];
  let next = 0;
  async function lane(): Promise<void> {
    while (next < indexes.length) {
      const index = indexes[next++]!;
      let device = devices.get(index);
      if (!device) {
        device = {
          index,
          mode,
          open: false,
          deviceJoined: false,
          groupJoined: false,
          ref: 0,
          deviceJoinRef: '',
          pending: new Map(),
          received: new Map(),
          updated: new Map(),
          installing: new Set(),
          bytesReceived: 0,
        };
        devices.set(index, device);
      }
      if (!resume) device.session = undefined;
      const t0 = nowMs();
      // A refused or reset attempt is retried a few times: storms hit listen-queue limits.
      for (let attempt = 1; ; attempt++) {
        try {
          if (mode === 'phoenix') await connectPhoenix(device);
          else if (mode === 'ws') await connectWs(device);
          else await connectMqtt(device);
          latencies.push(nowMs() - t0);
          const socket = (mode === 'mqtt' ? device.mqtt : (device.ws as unknown as { _socket?: TLSSocket })._socket) as
            | TLSSocket
            | undefined;
          if (socket?.isSessionReused()) resumed++;
          break;
        } catch (err) {
          device.ws?.terminate();
          device.mqtt?.destroy();
          retries++;
          retryError ??= (err as Error).message;
          if (attempt >= 5) {
            failed++;
            firstError ??= (err as Error).message;
            break;
          }
          await new Promise((r) => setTimeout(r, 50 * attempt));
        }
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, lane));
  const cpu = process.cpuUsage(cpuBefore);
  return {
    connected: indexes.length - failed,
    failed,
    resumed,
    elapsedMs: nowMs() - started,
    cpuMs: (cpu.user + cpu.system) / 1000,
    retries,
    retryError,
    firstError,
    latencies: summary(latencies),
  };
}

function summary(values: number[]): { p50: number; p99: number; max: number } {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
  return { p50: at(0.5), p99: at(0.99), max: sorted[sorted.length - 1] ?? NaN };
}

function status(): unknown {
  let open = 0;
  let deviceJoined = 0;
  let groupJoined = 0;
  for (const d of devices.values()) {
    if (d.open) open++;
    if (d.deviceJoined) deviceJoined++;
    if (d.groupJoined) groupJoined++;
  }
  return { open, deviceJoined, groupJoined };
}

/** Receipt times of `key` (a firmware version, or a floor/mqtt sequence number) for devices [from, to). */
function received(request: Request): unknown {
  const key = String(request.key);
  const times: number[] = [];
  let missing = 0;
  for (const d of devices.values()) {
    if (d.index < Number(request.from ?? -Infinity) || d.index >= Number(request.to ?? Infinity)) continue;
    const at = d.received.get(key);
    if (at === undefined) missing++;
    else times.push(at);
  }
  return {
    times,
    missing,
    frameBytes: lastFrameBytes,
    url: [...devices.values()].find((d) => d.firmwareUrl)?.firmwareUrl,
  };
}

function closeAll(): Promise<unknown> {
  const closing: Promise<void>[] = [];
  for (const d of devices.values()) {
    if (d.ws && d.ws.readyState !== WebSocket.CLOSED) {
      closing.push(new Promise((r) => d.ws!.once('close', () => r())));
      d.ws.terminate();
    }
    if (d.mqtt && !d.mqtt.destroyed) d.mqtt.destroy();
  }
  return Promise.all(closing).then(() => {
    for (const d of devices.values()) d.open = false;
    return { closed: closing.length };
  });
}

/** Waits until every device saw its socket closed by the server (a drain). */
async function awaitClosed(request: Request): Promise<unknown> {
  const deadline = nowMs() + Number(request.timeoutMs ?? 60_000);
  for (;;) {
    let open = 0;
    for (const d of devices.values()) if (d.open) open++;
    if (open === 0 || nowMs() > deadline) return { open };
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Publishes one QoS 0 message of `bytes` to the fanout topic from a fresh publisher connection. */
async function mqttPublish(request: Request): Promise<unknown> {
  const device: Device = {
    index: Number(request.publisherIndex),
    mode: 'mqtt',
    open: false,
    deviceJoined: false,
    groupJoined: false,
    ref: 0,
    deviceJoinRef: '',
    pending: new Map(),
    received: new Map(),
    updated: new Map(),
    installing: new Set(),
    bytesReceived: 0,
  };
  target = { host: '127.0.0.1', port: Number(request.port) };
  await connectMqtt(device, String(request.clientId));
  const payload = Buffer.alloc(Number(request.bytes), 0x61);
  payload.writeUInt32BE(Number(request.seq), 0);
  const packet = publishPacket(MQTT_TOPIC, payload);
  const t0 = nowMs();
  await new Promise<void>((resolve) => device.mqtt!.write(packet, () => resolve()));
  const written = nowMs();
  setTimeout(() => device.mqtt?.destroy(), 30_000).unref();
  return { t0, written };
}

/**
 * Update reports: each device in [from, to) sends `firmware_update_begin`, then one
 * `firmware_update_progress` per second (staggered over the second) for `seconds`.
 * Returns acked events and ack latencies (send → reply).
 */
async function ingest(request: Request): Promise<unknown> {
  const version = String(request.version);
  const seconds = Number(request.seconds);
  const chosen = [...devices.values()].filter(
    (d) => d.index >= Number(request.from) && d.index < Number(request.to) && d.deviceJoined,
  );
  let begun = 0;
  let beginErrors = 0;
  let firstError: string | undefined;
  await Promise.all(
    chosen.map(async (d) => {
      const reply = await send(d, d.deviceJoinRef, `device:${firmwareUuid}`, 'firmware_update_begin', { version });
      if (reply.status === 'ok') begun++;
      else {
        beginErrors++;
        firstError ??= JSON.stringify(reply.response);
      }
    }),
  );
  const latencies: number[] = [];
  let sent = 0;
  let acked = 0;
  let errors = 0;
  const start = nowMs();
  const stopAt = start + seconds * 1000;
  const pendingAcks: Promise<void>[] = [];
  await Promise.all(
    chosen.map(async (d, i) => {
      await new Promise((r) => setTimeout(r, (1000 * i) / chosen.length));
      for (let tick = 1; nowMs() < stopAt; tick++) {
        const sentAt = nowMs();
        sent++;
        pendingAcks.push(
          send(d, d.deviceJoinRef, `device:${firmwareUuid}`, 'firmware_update_progress', {
            version,
            percent: tick % 100,
            bytes: tick * 1024,
            total: 100 * 1024,
          }).then((reply) => {
            if (reply.status === 'ok') {
              acked++;
              latencies.push(reply.at - sentAt);
            } else {
              errors++;
              firstError ??= JSON.stringify(reply.response);
            }
          }),
        );
        const nextAt = start + (1000 * i) / chosen.length + tick * 1000;
        await new Promise((r) => setTimeout(r, Math.max(0, nextAt - nowMs())));
      }
    }),
  );
  const sendingEnded = nowMs();
  await Promise.race([Promise.all(pendingAcks), new Promise((r) => setTimeout(r, 30_000))]);
  const drainedAt = nowMs();
  return {
    devices: chosen.length,
    begun,
    beginErrors,
    sent,
    acked,
    errors,
    firstError,
    sendingMs: sendingEnded - start,
    totalMs: drainedAt - start,
    latencies: summary(latencies),
  };
}

/** 50 (or `count`) concurrent mTLS downloads of `url`; aggregate throughput. */
async function download(request: Request): Promise<unknown> {
  const urls = request.urls as string[];
  const agentOptions = { keepAlive: false };
  const started = nowMs();
  let bytes = 0;
  const perDevice: number[] = [];
  await Promise.all(
    urls.map(
      (url, i) =>
        new Promise<void>((resolve, reject) => {
          const device = { index: from + i } as Device;
          const req = https.get(url, { ...tlsOptions(device), agent: new https.Agent(agentOptions) }, (res) => {
            if (res.statusCode !== 200) {
              reject(new Error(`download answered ${res.statusCode}`));
              res.resume();
              return;
            }
            let mine = 0;
            res.on('data', (chunk: Buffer) => (mine += chunk.length));
            res.on('end', () => {
              bytes += mine;
              perDevice.push(mine);
              resolve();
            });
            res.on('error', reject);
          });
          req.on('error', reject);
        }),
    ),
  );
  const elapsedMs = nowMs() - started;
  return { bytes, elapsedMs, downloads: perDevice.length, mibPerS: bytes / 1024 / 1024 / (elapsedMs / 1000) };
}

// Heartbeats like the official client (every 30 s), spread: 1/30 of the devices each second.
let tick = 0;
setInterval(() => {
  tick = (tick + 1) % 30;
  for (const d of devices.values()) {
    if (d.mode !== 'phoenix' || !d.open || d.index % 30 !== tick) continue;
    d.ws!.send(`[null,"hb${++d.ref}","phoenix","heartbeat",{}]`);
  }
}, 1000).unref();

/**
 * For `version` (autoUpdate): devices that rejoined running it, devices installing it now, and
 * installs that gave up, by the step that failed, with the first error.
 */
function updated(request: Request): unknown {
  const version = String(request.version);
  let done = 0;
  let installing = 0;
  for (const d of devices.values()) {
    if (d.updated.has(version)) done++;
    if (d.installing.has(version)) installing++;
  }
  const failures = updateFailures.begin + updateFailures.finish + updateFailures.reconnect;
  return { updated: done, installing, failures, failuresBy: updateFailures, firstError: updateFirstError };
}

serveRpc({
  autoUpdate(request: Request) {
    autoUpdate = request.on === true;
    reconnectSlots.limit = Number(request.reconnectLimit ?? 0);
    return null;
  },
  updated,
  connect: connectRange,
  status,
  received,
  closeAll,
  awaitClosed,
  mqttPublish,
  ingest,
  download,
  memory: () => process.memoryUsage(),
});
process.send?.({ ready: true, from, to, localAddress });
