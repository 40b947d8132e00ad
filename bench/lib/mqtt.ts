/**
 * The smallest MQTT 3.1.1 client the Mosquitto baselines need: CONNECT, SUBSCRIBE (QoS 0),
 * PUBLISH (QoS 0) over an already-connected TLS socket, and a packet reader.
 */
import type { TLSSocket } from 'node:tls';

function remainingLength(n: number): Buffer {
  const bytes: number[] = [];
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    bytes.push(byte);
  } while (n > 0);
  return Buffer.from(bytes);
}

function str(s: string): Buffer {
  const body = Buffer.from(s, 'utf8');
  const out = Buffer.alloc(2 + body.length);
  out.writeUInt16BE(body.length, 0);
  body.copy(out, 2);
  return out;
}

function packet(type: number, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([type]), remainingLength(body.length), body]);
}

/** CONNECT with a clean session and no keep-alive (the baseline holds idle connections). */
export function connectPacket(clientId: string): Buffer {
  const header = Buffer.concat([str('MQTT'), Buffer.from([4, 0x02, 0, 0])]);
  return packet(0x10, Buffer.concat([header, str(clientId)]));
}

export function subscribePacket(packetId: number, topic: string): Buffer {
  const id = Buffer.alloc(2);
  id.writeUInt16BE(packetId, 0);
  return packet(0x82, Buffer.concat([id, str(topic), Buffer.from([0])]));
}

export function publishPacket(topic: string, payload: Buffer): Buffer {
  return packet(0x30, Buffer.concat([str(topic), payload]));
}

export const CONNACK = 2;
export const PUBLISH = 3;
export const SUBACK = 9;

/** Splits the byte stream into packets; calls `onPacket(type, body)` for each complete one. */
export function mqttReader(socket: TLSSocket, onPacket: (type: number, body: Buffer) => void): void {
  let pending: Buffer | null = null;
  socket.on('data', (chunk: Buffer) => {
    let buf = pending ? Buffer.concat([pending, chunk]) : chunk;
    pending = null;
    for (;;) {
      if (buf.length < 2) break;
      let length = 0;
      let multiplier = 1;
      let i = 1;
      let complete = false;
      while (i < buf.length && i <= 4) {
        const byte = buf[i]!;
        length += (byte & 0x7f) * multiplier;
        multiplier *= 128;
        i++;
        if ((byte & 0x80) === 0) {
          complete = true;
          break;
        }
      }
      if (!complete || buf.length < i + length) break;
      onPacket(buf[0]! >> 4, buf.subarray(i, i + length));
      buf = buf.subarray(i + length);
    }
    if (buf.length > 0) pending = Buffer.from(buf);
  });
}
