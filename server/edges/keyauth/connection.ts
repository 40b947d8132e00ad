/**
 * One keyauth TCP connection: framing, the 101 → 102/103 handshake, envelopes both ways after
 * 103, limits. Requests are handled one at a time (the socket is paused meanwhile, so a flooding
 * client meets TCP backpressure); the idle timer restarts only on complete messages, so a client
 * dribbling bytes without newlines (slowloris) is closed; repeated bad messages close it too.
 * The connection runs on the edge runtime (../runtime.ts): requests are its steps, the handshake
 * and idle deadlines its timer, and once authorised it listens on the device's topic, so a
 * revocation or deletion closes it on whichever node it is.
 */
import type { KeyObject } from 'node:crypto';
import type { Socket } from 'node:net';
import { describeBadString, findBadString } from '../../input-gate.ts';
import { rateLimitedWarning, type Logger } from '../../log.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { linkEvent, openLink } from '../../fleet/device-link.ts';
import type { EdgeRuntime } from '../runtime.ts';
import { FleetError } from '../../fleet/errors.ts';
import type { Product } from '../../fleet/orgs.ts';
import { errorResponse, runAction, type ActionDeps, type ActionSession, type Response } from './actions.ts';
import { clientDevice, identifierFor } from './clients.ts';
import { EnvelopeError, isEnvelope, KeyError, open, parseClientKey, seal } from '../../../shared/keyauth-envelope.ts';
import { encodeLine, LineReader, LineTooLongError } from './framing.ts';

export interface ConnectionLimits {
  maxLineBytes: number;
  /** The 101 must arrive within this long. */
  handshakeTimeoutMs: number;
  /** Close a connection that sent no complete message for this long. */
  idleTimeoutMs: number;
  /** Bad messages (plaintext after 103, undecryptable, malformed) before the connection is closed. */
  maxFailures: number;
  /** Requests per second a connection may average (burst: twice that). */
  maxRequestsPerSecond: number;
  /** Close a client that does not read its responses once this much output is queued. */
  maxBufferedBytes: number;
}

export interface ConnectionDeps extends ActionDeps {
  fleet: FleetContext;
  log: Logger;
  tenant: () => Promise<Product>;
  serverKey: { privateKey: KeyObject; publicKeyPem: string };
  limits: ConnectionLimits;
  runtime: EdgeRuntime;
}

type State = { phase: 'hello' } | { phase: 'authorised'; session: ActionSession; clientKey: KeyObject };

const notAuthorised = new WeakMap<Logger, ReturnType<typeof rateLimitedWarning>>();
/** The listener's rate-limited "key not authorised" line (one per listener logger, shared by its connections). */
function notAuthorisedOf(log: Logger): ReturnType<typeof rateLimitedWarning> {
  let fn = notAuthorised.get(log);
  if (!fn) {
    fn = rateLimitedWarning(log, 'keyauth key not authorised', 60_000, 'info');
    notAuthorised.set(log, fn);
  }
  return fn;
}

/** Drives one socket until it closes; resolves when it has. */
export function handleConnection(socket: Socket, deps: ConnectionDeps): Promise<void> {
  const { limits } = deps;
  const reader = new LineReader(limits.maxLineBytes);
  const remote = socket.remoteAddress ?? null;
  const log = deps.log.child({ remote });
  let state: State = { phase: 'hello' };
  let failures = 0;
  /** Lines read and not handled yet; `limited`: it arrived over the request rate (counted on arrival). */
  const queue: { line: string; limited: boolean }[] = [];
  let busy = false;
  let closed = false;
  let tokens = limits.maxRequestsPerSecond * 2;
  let refilledAt = Date.now();
  /** Why the deadline timer closes the connection when it fires. */
  let deadline = '';

  const link = deps.runtime.open({
    edge: 'keyauth',
    log,
    transport: {
      close: (_code, why) => {
        closed = true;
        log.debug({ why }, 'keyauth connection closing');
        socket.end();
        // A client that stops reading would keep the socket half-open.
        setTimeout(() => socket.destroy(), 1000).unref();
      },
    },
    handlers: {
      timer: async () => close(deadline),
      // After the request in flight (it may have just marked the client online).
      closed: async () => {
        if (state.phase === 'authorised')
          await linkEvent(deps.fleet, state.session, { type: 'closed', reason: 'socket closed' });
      },
    },
  });

  const armTimer = (ms: number, why: string) => {
    deadline = why;
    link.schedule('deadline', ms);
  };

  /** The close effect: the runtime ends the stream (revocation, deadline, drain at shutdown). */
  const close = (why: string) => link.close(1000, why);

  const send = (message: unknown) => {
    if (closed || socket.destroyed) return;
    socket.write(encodeLine(message));
    if (socket.writableLength > limits.maxBufferedBytes) {
      log.warn('keyauth client does not read its responses; disconnecting');
      socket.destroy();
    }
  };

  /** Replies to an authorised client inside an envelope; before 103, or when sealing is impossible, in plaintext. */
  const reply = (response: Response) => {
    if (state.phase === 'authorised') send(seal(state.clientKey, response));
    else send(response);
  };

  /** Counts a bad message; answers it in plaintext (the client may not be able to decrypt anything) and closes after too many. */
  const fail = (code: number, type: string, msg: string) => {
    failures++;
    send(
      errorResponse(
        code,
        type,
        failures >= limits.maxFailures ? `${msg} (closing after ${failures} bad messages)` : msg,
      ),
    );
    if (failures >= limits.maxFailures) close('too many bad messages');
  };

  const takeToken = (): boolean => {
    const now = Date.now();
    tokens = Math.min(
      limits.maxRequestsPerSecond * 2,
      tokens + ((now - refilledAt) / 1000) * limits.maxRequestsPerSecond,
    );
    refilledAt = now;
    if (tokens < 1) return false;
    tokens -= 1;
    return true;
  };

  const hello = async (message: unknown) => {
    const m = (typeof message === 'object' && message !== null ? message : {}) as Record<string, unknown>;
    if (m.code !== 101)
      return fail(
        400,
        'InvalidRequest',
        'authorise first: send {"code": 101, "data": {"key": "<your RSA-2048 public key, SPKI PEM>"}}',
      );
    const data = (typeof m.data === 'object' && m.data !== null ? m.data : {}) as Record<string, unknown>;
    let key: ReturnType<typeof parseClientKey>;
    try {
      key = parseClientKey(data.key);
    } catch (err) {
      if (err instanceof KeyError) return fail(400, 'InvalidKey', err.message);
      throw err;
    }
    const name = typeof data.name === 'string' && data.name.length <= 100 ? data.name : null;
    let device: Awaited<ReturnType<typeof clientDevice>>;
    try {
      device = await clientDevice(deps.fleet, await deps.tenant(), key, { name, remote });
    } catch (err) {
      // The key's identifier belongs to a device of another protocol (fleet identity rule, audited there).
      if (err instanceof FleetError && err.code === 'conflict') {
        log.warn(
          { fingerprint: key.fingerprint },
          'keyauth key refused: its identifier belongs to another kind of device',
        );
        return fail(
          409,
          'IdentityTaken',
          `this key's identifier ${identifierFor(key.fingerprint)} is registered to another kind of device; use another key`,
        );
      }
      throw err;
    }
    if (device.approval !== 'approved') {
      const revoked = device.approval === 'revoked';
      // A pending key retries every few seconds: one line a minute per key, with how often it came.
      notAuthorisedOf(deps.log)(key.fingerprint, { fingerprint: key.fingerprint, approval: device.approval, remote });
      return send({
        code: 102,
        error: {
          msg: revoked
            ? 'this key has been revoked'
            : `this key is not authorised yet; an operator must approve fingerprint ${key.fingerprint} ("fleethub keyauth approve ${key.fingerprint.slice(0, 16)}")`,
          type: revoked ? 'KeyRevoked' : 'KeyPending',
        },
        data: { fingerprint: key.fingerprint },
      });
    }
    // Online now; its version comes with its first status or check_update.
    const online = await linkEvent(
      deps.fleet,
      openLink({ deviceId: device.id, orgId: device.org_id, productId: device.product_id, protocol: 'keyauth' }),
      { type: 'connected', running: {} },
    );
    if (!online.ok) throw new FleetError(online.refusal.code, online.refusal.message, online.refusal.details);
    const session: ActionSession = { ...online.session, identifier: device.identifier };
    await link.attach({ deviceId: device.id, orgId: device.org_id });
    state = { phase: 'authorised', session, clientKey: key.key };
    failures = 0;
    log.info({ fingerprint: key.fingerprint, device_id: device.id }, 'keyauth client authorised');
    send({ code: 103, data: { key: deps.serverKey.publicKeyPem } });
  };

  const authorised = async (message: unknown, s: Extract<State, { phase: 'authorised' }>) => {
    if (!isEnvelope(message))
      return fail(
        400,
        'NotEncrypted',
        'after code 103 every message must be an envelope {"enc": {key, iv, ct, tag}} encrypted to the server key',
      );
    let request: unknown;
    try {
      request = open(deps.serverKey.privateKey, message);
    } catch (err) {
      if (err instanceof EnvelopeError) return fail(400, err.type, err.message);
      throw err;
    }
    const bad = findBadString(request, '');
    if (bad) return fail(400, 'InvalidString', describeBadString(bad));
    failures = 0;
    reply(await runAction(deps, s.session, request));
  };

  const handle = async (line: string, limited: boolean) => {
    if (limited)
      return fail(400, 'RateLimited', `more than ${limits.maxRequestsPerSecond} requests per second; slow down`);
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      return fail(400, 'InvalidJson', 'each line must be one JSON object');
    }
    const bad = findBadString(message, '');
    if (bad) return fail(400, 'InvalidString', describeBadString(bad));
    if (state.phase === 'hello') await hello(message);
    else await authorised(message, state);
  };

  const drain = async () => {
    if (busy) return;
    busy = true;
    socket.pause();
    try {
      while (queue.length && !closed) {
        const { line, limited } = queue.shift()!;
        await link.step(async () => {
          try {
            await handle(line, limited);
          } catch (err) {
            log.error({ err }, 'keyauth request failed');
            reply(errorResponse(500, 'ServerError', 'the server failed to handle the message; try again later'));
          }
        });
      }
    } finally {
      busy = false;
      if (!closed) socket.resume();
    }
  };

  return new Promise<void>((resolve) => {
    armTimer(limits.handshakeTimeoutMs, 'no 101 in time');
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      if (closed) return;
      let lines: string[];
      try {
        lines = reader.push(chunk);
      } catch (err) {
        if (err instanceof LineTooLongError) {
          send(errorResponse(400, 'LineTooLong', err.message));
          close('line too long');
          return;
        }
        throw err;
      }
      if (lines.length === 0) return;
      armTimer(limits.idleTimeoutMs, 'idle');
      // The rate is counted as lines arrive, not as they are handled: a flood is refused however
      // slowly the server works through it.
      for (const line of lines) queue.push({ line, limited: !takeToken() });
      void drain();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      closed = true;
      link.transportClosed();
      void link.finished.then(resolve);
    });
  });
}
