import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import net from 'node:net';
import { after, describe, test } from 'node:test';
import { WifidogxGateway } from '../../device-client/simulators/wifidogx.ts';
import { until } from '../helpers/until.ts';

// The WiFiDogX simulator reads as the real gateway does (one frame per read): against a raw
// server that breaks the rule, it must fail loudly, however the test machine is loaded.

function textFrame(message: Record<string, unknown>): Buffer {
  const payload = Buffer.from(JSON.stringify(message));
  return Buffer.concat([Buffer.from([0x81, payload.length]), payload]);
}

/**
 * A WebSocket server by hand: answers the upgrade, then on the gateway's first frame writes
 * `reply` in one write, or `reply(socket)` does.
 */
function rawServer(reply: Buffer | ((socket: net.Socket) => void)): Promise<net.Server> {
  const server = net.createServer((socket) => {
    let upgraded = false;
    socket.on('data', (chunk) => {
      if (!upgraded) {
        const key = /sec-websocket-key: (\S+)/i.exec(chunk.toString('latin1'))![1]!;
        const accept = createHash('sha1').update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
        socket.write(
          `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`,
        );
        upgraded = true;
        return;
      }
      if (typeof reply === 'function') reply(socket);
      else socket.write(reply);
    });
    socket.on('error', () => undefined);
  });
  server.listen(0, '127.0.0.1');
  return once(server, 'listening').then(() => server);
}

describe('the WiFiDogX simulator', () => {
  const closers: Array<() => Promise<void>> = [];
  after(async () => {
    for (const close of closers) await close();
  });

  async function gatewayAgainst(reply: Parameters<typeof rawServer>[0]): Promise<WifidogxGateway> {
    const server = await rawServer(reply);
    const gateway = new WifidogxGateway({
      url: `ws://127.0.0.1:${(server.address() as net.AddressInfo).port}/ws/wifidogx`,
      deviceId: 'sim-raw-1',
      version: '1.0.0',
    });
    closers.push(async () => {
      await gateway.stop();
      await new Promise<void>((r) => server.close(() => r()));
    });
    await gateway.start();
    return gateway;
  }

  test('reports two frames written back to back as a protocol violation', async () => {
    const reply = Buffer.concat([
      textFrame({ type: 'connect', gateway: [{ gw_id: 'gw-1', auth_mode: 1 }] }),
      textFrame({ type: 'get_firmware_info', op: 'get_firmware_info' }),
    ]);
    const gateway = await gatewayAgainst(reply);
    await until(() => gateway.violations.length > 0 || gateway.received.length > 0, 'the reply read');
    assert.deepEqual(gateway.violations, ['two frames in one read']);
    assert.equal(gateway.received.length, 0, 'neither frame was taken as a message');
  });

  test('reads one frame per read as messages', async () => {
    const gateway = await gatewayAgainst(textFrame({ type: 'connect', gateway: [{ gw_id: 'gw-1', auth_mode: 1 }] }));
    await until(() => gateway.received.length > 0, 'the reply read');
    assert.deepEqual(gateway.violations, []);
    assert.equal(gateway.received[0]!.type, 'connect');
  });

  test('frames the server spaced out, read together because this process stalled, are read one by one', async () => {
    const gateway = await gatewayAgainst((socket) => {
      socket.write(textFrame({ type: 'connect', gateway: [{ gw_id: 'gw-1', auth_mode: 1 }] }));
      // The second frame 20 ms later, as the server spaces them; the event loop is blocked for
      // 200 ms before the gateway can read the first, so both wait in one read.
      setTimeout(() => socket.write(textFrame({ type: 'get_firmware_info', op: 'get_firmware_info' })), 20);
      const end = Date.now() + 200;
      while (Date.now() < end);
    });
    await until(() => gateway.received.length >= 2 || gateway.violations.length > 0, 'both frames read');
    assert.deepEqual(gateway.violations, []);
    assert.deepEqual(
      gateway.received.map((m) => m.type),
      ['connect', 'get_firmware_info'],
    );
    assert.equal(gateway.stalledReads, 1);
  });
});
