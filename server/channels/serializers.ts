/**
 * Phoenix wire serializers: V1 JSON objects, V2 JSON arrays and V2 binary frames.
 * Pure functions: no I/O, no logger, no state. JSON frames are `[join_ref, ref, topic, event, payload]`
 * (V2) or `{join_ref, ref, topic, event, payload}` (V1); the binary layouts are described at their encoders below.
 */
import type { Payload, Reply } from './types.ts';

/** A frame decoded from a client. Binary pushes carry `{ binary: Buffer }` as payload. */
export interface InboundMessage {
  joinRef: string | null;
  ref: string | null;
  topic: string;
  event: string;
  payload: Payload;
}

export type DecodeResult =
  | { ok: true; message: InboundMessage }
  /** `ref`/`topic` are set when the frame was readable enough to answer an error reply. */
  | { ok: false; error: string; joinRef: string | null; ref: string | null; topic: string | null };

/**
 * One encoded frame. The same object is written to every subscriber of a broadcast; `text` is
 * a lazily cached string copy for transports that need strings (LongPoll).
 */
export interface OutFrame {
  bytes: Buffer;
  binary: boolean;
  text?: string;
}

export interface Serializer {
  readonly vsn: '1.0.0' | '2.0.0';
  decode(data: Buffer, isBinary: boolean): DecodeResult;
  /** A push, broadcast or lifecycle message (`phx_close`, `phx_error`). */
  message(joinRef: string | null, ref: string | null, topic: string, event: string, payload: Payload): OutFrame;
  reply(joinRef: string | null, ref: string | null, topic: string, reply: Reply): OutFrame;
}

/** A payload of raw bytes (V2 binary frames), the only non-JSON payload the protocol carries. */
export interface BinaryPayload extends Payload {
  binary: Uint8Array;
}

/** Wraps bytes so the engine sends them as a V2 binary frame. */
export function binaryPayload(data: Uint8Array): BinaryPayload {
  return { binary: data };
}

export function isBinaryPayload(payload: Payload): payload is BinaryPayload {
  return payload.binary instanceof Uint8Array && Object.keys(payload).length === 1;
}

export function isPlainObject(value: unknown): value is Payload {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Uint8Array);
}

const KIND_PUSH = 0;
const KIND_REPLY = 1;
const KIND_BROADCAST = 2;

/** Refs are opaque strings; some clients send integers, which we keep as their decimal text. */
function refOf(value: unknown): string | null | undefined {
  if (value === null || value === undefined) return null;
  if (typeof value === 'string') return value;
  if (typeof value === 'number' && Number.isFinite(value)) return String(value);
  return undefined;
}

function textFrame(text: string): OutFrame {
  return { bytes: Buffer.from(text, 'utf8'), binary: false, text };
}

function invalid(error: string, joinRef: unknown, ref: unknown, topic: unknown): DecodeResult {
  return {
    ok: false,
    error,
    joinRef: refOf(joinRef) ?? null,
    ref: refOf(ref) ?? null,
    topic: typeof topic === 'string' ? topic : null,
  };
}

function validated(joinRef: unknown, ref: unknown, topic: unknown, event: unknown, payload: unknown): DecodeResult {
  const jr = refOf(joinRef);
  const r = refOf(ref);
  if (jr === undefined || r === undefined) return invalid('join_ref and ref must be strings or null', null, null, null);
  if (typeof topic !== 'string' || typeof event !== 'string')
    return invalid('topic and event must be strings', jr, r, topic);
  if (!isPlainObject(payload)) return invalid('payload must be an object', jr, r, topic);
  return { ok: true, message: { joinRef: jr, ref: r, topic, event, payload } };
}

function parseJson(data: Buffer): { ok: true; value: unknown } | { ok: false } {
  try {
    return { ok: true, value: JSON.parse(data.toString('utf8')) };
  } catch {
    return { ok: false };
  }
}

/** V1: `{topic, event, payload, ref, join_ref?}` JSON objects, text frames only. */
export const v1Json: Serializer = {
  vsn: '1.0.0',
  decode(data, isBinary) {
    if (isBinary) return invalid('binary frames need vsn=2.0.0', null, null, null);
    const parsed = parseJson(data);
    if (!parsed.ok) return invalid('frame is not valid JSON', null, null, null);
    const v = parsed.value;
    if (!isPlainObject(v)) return invalid('a V1 frame must be a JSON object', null, null, null);
    return validated(v.join_ref, v.ref, v.topic, v.event, v.payload);
  },
  message(joinRef, ref, topic, event, payload) {
    return textFrame(JSON.stringify({ topic, event, payload, ref, join_ref: joinRef }));
  },
  reply(joinRef, ref, topic, reply) {
    return textFrame(JSON.stringify({ topic, event: 'phx_reply', payload: reply, ref, join_ref: joinRef }));
  },
};

function binaryDecode(data: Buffer): DecodeResult {
  if (data.length < 5 || data[0] !== KIND_PUSH) return invalid('binary frame is not a push (kind 0)', null, null, null);
  const lens = [data[1]!, data[2]!, data[3]!, data[4]!];
  let offset = 5;
  const fields: string[] = [];
  for (const len of lens) {
    if (offset + len > data.length) return invalid('binary frame is shorter than its header says', null, null, null);
    fields.push(data.toString('utf8', offset, offset + len));
    offset += len;
  }
  const [joinRef, ref, topic, event] = fields as [string, string, string, string];
  // Binary payloads are opaque bytes; copy so the frame buffer can be released.
  return {
    ok: true,
    message: {
      joinRef: joinRef || null,
      ref: ref || null,
      topic,
      event,
      payload: { binary: Buffer.from(data.subarray(offset)) },
    },
  };
}

function lengthOf(value: string, field: string): number {
  const len = Buffer.byteLength(value, 'utf8');
  if (len > 255) throw new RangeError(`${field} is ${len} bytes; binary frames allow 255 at most`);
  return len;
}

/** Binary layout with u8 length prefixes; header and strings in one allocation, then the data. */
function binaryEncode(kind: number, strings: { value: string; field: string }[], data: Uint8Array): OutFrame {
  const lens = strings.map((s) => lengthOf(s.value, s.field));
  const headerLength = 1 + lens.length + lens.reduce((a, b) => a + b, 0);
  const bytes = Buffer.allocUnsafe(headerLength + data.byteLength);
  bytes[0] = kind;
  let offset = 1;
  for (const len of lens) bytes[offset++] = len;
  for (const s of strings) offset += bytes.write(s.value, offset, 'utf8');
  bytes.set(data, offset);
  return { bytes, binary: true };
}

/** V2: `[join_ref, ref, topic, event, payload]` JSON arrays, plus binary frames for binary payloads. */
export const v2Json: Serializer = {
  vsn: '2.0.0',
  decode(data, isBinary) {
    if (isBinary) return binaryDecode(data);
    const parsed = parseJson(data);
    if (!parsed.ok) return invalid('frame is not valid JSON', null, null, null);
    const v = parsed.value;
    if (!Array.isArray(v))
      return invalid('a V2 frame must be a JSON array [join_ref, ref, topic, event, payload]', null, null, null);
    if (v.length < 5)
      return invalid('a V2 frame needs 5 elements [join_ref, ref, topic, event, payload]', v[0], v[1], v[2]);
    // Extra trailing elements are ignored, as Phoenix does.
    return validated(v[0], v[1], v[2], v[3], v[4]);
  },
  message(joinRef, ref, topic, event, payload) {
    if (isBinaryPayload(payload)) {
      if (joinRef === null && ref === null) {
        return binaryEncode(
          KIND_BROADCAST,
          [
            { value: topic, field: 'topic' },
            { value: event, field: 'event' },
          ],
          payload.binary,
        );
      }
      if (ref === null) {
        const strings = [
          { value: joinRef ?? '', field: 'join_ref' },
          { value: topic, field: 'topic' },
          { value: event, field: 'event' },
        ];
        return binaryEncode(KIND_PUSH, strings, payload.binary);
      }
    }
    return textFrame(JSON.stringify([joinRef, ref, topic, event, payload]));
  },
  reply(joinRef, ref, topic, reply) {
    if (isBinaryPayload(reply.response)) {
      const strings = [
        { value: joinRef ?? '', field: 'join_ref' },
        { value: ref ?? '', field: 'ref' },
        { value: topic, field: 'topic' },
        { value: reply.status, field: 'status' },
      ];
      return binaryEncode(KIND_REPLY, strings, reply.response.binary);
    }
    return textFrame(JSON.stringify([joinRef, ref, topic, 'phx_reply', reply]));
  },
};

/** The serializer for a `vsn` query parameter; undefined for versions we do not speak. */
export function serializerFor(vsn: string | undefined): Serializer | undefined {
  // Like Phoenix's defaults: "~> 1.0.0" and "~> 2.0.0".
  if (vsn === undefined || vsn === '' || /^1\.0\.\d+$/.test(vsn)) return v1Json;
  if (/^2\.0\.\d+$/.test(vsn)) return v2Json;
  return undefined;
}
