/**
 * JSON-RPC 2.0 framing for the GRiSP link (pure: no I/O). One WebSocket text message carries a
 * single message or a batch. Ids are echoed exactly as received (grisp_connect sends strings
 * such as "-576460752303423487"); notifications never get a reply.
 */

import { describeBadString, findBadString } from '../../input-gate.ts';

export type RpcId = string | number | null;

export const RpcErrors = {
  parse: { code: -32700, message: 'Parse error' },
  invalidRequest: { code: -32600, message: 'Invalid Request' },
  methodNotFound: { code: -32601, message: 'Method not found' },
  invalidParams: { code: -32602, message: 'Invalid params' },
  internal: { code: -32603, message: 'Internal error' },
} as const;

export interface RpcErrorBody {
  code: number;
  message: string;
  data?: unknown;
}

/** One decoded message of an incoming frame. */
export type Incoming =
  | { kind: 'request'; id: RpcId; method: string; params: unknown }
  | { kind: 'notification'; method: string; params: unknown }
  | { kind: 'result'; id: RpcId; result: unknown }
  | { kind: 'error'; id: RpcId; error: RpcErrorBody }
  /** Not a valid message: answer with this error (id null when none could be read). */
  | { kind: 'invalid'; id: RpcId; error: RpcErrorBody };

export interface Decoded {
  batch: boolean;
  messages: Incoming[];
  /** Set when the frame is not JSON at all (answer -32700, id null). */
  parseError?: true;
}

/** An error a handler throws to answer the request with this code (custom or standard). */
export class RpcError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly data?: unknown,
  ) {
    super(message);
    this.name = 'RpcError';
  }

  toJSON(): RpcErrorBody {
    return { code: this.code, message: this.message, ...(this.data !== undefined ? { data: this.data } : {}) };
  }
}

/** Decodes one text frame into its messages (never throws). */
export function decodeFrame(text: string): Decoded {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return { batch: false, messages: [], parseError: true };
  }
  if (Array.isArray(value)) {
    // An empty batch is itself an invalid request (one error, not an empty array).
    if (value.length === 0)
      return { batch: false, messages: [{ kind: 'invalid', id: null, error: RpcErrors.invalidRequest }] };
    return { batch: true, messages: value.map(decodeMessage) };
  }
  return { batch: false, messages: [decodeMessage(value)] };
}

function decodeMessage(value: unknown): Incoming {
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    return { kind: 'invalid', id: null, error: RpcErrors.invalidRequest };
  const m = value as Record<string, unknown>;
  const hasId = 'id' in m;
  const id = validId(m.id) ? (m.id as RpcId) : null;
  if (m.jsonrpc !== '2.0' || (hasId && !validId(m.id))) return { kind: 'invalid', id, error: RpcErrors.invalidRequest };
  // NUL or a lone surrogate anywhere never reaches a handler: a request (or notification) is answered
  // invalid params naming the field; a response to one of ours becomes that error for the caller.
  const bad = findBadString(m, '');
  if (bad) {
    const error = { ...RpcErrors.invalidParams, data: describeBadString(bad) };
    return typeof m.method !== 'string' && hasId ? { kind: 'error', id, error } : { kind: 'invalid', id, error };
  }
  if (typeof m.method === 'string') {
    if ('params' in m && (typeof m.params !== 'object' || m.params === null))
      return { kind: 'invalid', id, error: RpcErrors.invalidRequest };
    return hasId
      ? { kind: 'request', id, method: m.method, params: m.params }
      : { kind: 'notification', method: m.method, params: m.params };
  }
  if ('method' in m) return { kind: 'invalid', id, error: RpcErrors.invalidRequest };
  if ('result' in m && hasId) return { kind: 'result', id, result: m.result };
  if (isErrorBody(m.error) && hasId) return { kind: 'error', id, error: m.error };
  return { kind: 'invalid', id, error: RpcErrors.invalidRequest };
}

function validId(id: unknown): boolean {
  return id === null || typeof id === 'string' || (typeof id === 'number' && Number.isFinite(id));
}

function isErrorBody(e: unknown): e is RpcErrorBody {
  return (
    typeof e === 'object' &&
    e !== null &&
    Number.isInteger((e as RpcErrorBody).code) &&
    typeof (e as RpcErrorBody).message === 'string'
  );
}

export function encodeRequest(id: string, method: string, params?: Record<string, unknown>): Record<string, unknown> {
  return { jsonrpc: '2.0', id, method, ...(params ? { params } : {}) };
}

export function encodeNotification(method: string, params?: Record<string, unknown>): Record<string, unknown> {
  return { jsonrpc: '2.0', method, ...(params ? { params } : {}) };
}

export function encodeResult(id: RpcId, result: unknown): Record<string, unknown> {
  return { jsonrpc: '2.0', id, result };
}

export function encodeError(id: RpcId, error: RpcErrorBody): Record<string, unknown> {
  return { jsonrpc: '2.0', id, error };
}

/** Params as an object (GRiSP methods take named params), or undefined. */
export function paramsObject(params: unknown): Record<string, unknown> | undefined {
  return typeof params === 'object' && params !== null && !Array.isArray(params)
    ? (params as Record<string, unknown>)
    : undefined;
}
