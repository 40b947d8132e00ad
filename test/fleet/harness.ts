/**
 * A minimal device-side server for the fleet end-to-end tests: the real mutual-TLS device
 * listener, the channel engine with the device socket mounted at /socket, and a fleet context
 * whose bus is the engine's PubSub. Ephemeral port; `close()` releases everything.
 */
import type { AddressInfo } from 'node:net';
import pino from 'pino';
import { createEndpoint, createPubSub, type Endpoint, type PubSubWithStats } from '../../server/channels/index.ts';
import type { Db } from '../../server/db/index.ts';
import { createDeviceSocket, type DeviceSocket } from '../../server/device-socket/index.ts';
import { pubsubBus, type FleetContext } from '../../server/fleet/index.ts';
import { createDeviceListener, deviceIdentityOf, type DeviceListener } from '../../server/listeners/device.ts';
import { getTestPki } from '../helpers/pki.ts';

export interface FleetServer {
  ctx: FleetContext;
  endpoint: Endpoint;
  pubsub: PubSubWithStats;
  deviceSocket: DeviceSocket;
  listener: DeviceListener;
  /** `wss://127.0.0.1:<port>/socket` */
  url: string;
  close(): Promise<void>;
}

export async function startFleetServer(db: Db, nodeName = 'e2e-node'): Promise<FleetServer> {
  const pki = await getTestPki();
  const log = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });
  const pubsub = createPubSub({ log });
  const ctx: FleetContext = {
    db,
    log,
    nodeName,
    bus: pubsubBus(pubsub),
    firmwareUrl: (f) => `https://127.0.0.1/firmware/${f.id}`,
  };
  let endpoint: Endpoint | undefined;
  const deviceSocket = createDeviceSocket(ctx, {
    identityOf: deviceIdentityOf,
    closeLocal: (id, reason) => endpoint?.closeSockets(id, reason),
  });
  endpoint = createEndpoint(deviceSocket, { pubsub, log });
  const listener = await createDeviceListener({ db, log, tls: pki.server });
  await endpoint.register(listener.app, { path: '/socket' });
  await listener.app.listen({ port: 0, host: '127.0.0.1' });
  const port = (listener.app.server.address() as AddressInfo).port;
  const ep = endpoint;
  return {
    ctx,
    endpoint: ep,
    pubsub,
    deviceSocket,
    listener,
    url: `wss://127.0.0.1:${port}/socket`,
    async close() {
      await ep.drain(1001).catch(() => {});
      await listener.close();
      await ep.close();
      await pubsub.close();
    },
  };
}
