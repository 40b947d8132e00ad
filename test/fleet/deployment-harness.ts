/**
 * What the deployment tests share: firmware uploaded through the CLI's streaming upload, real
 * Phoenix devices (this package's client) on a base firmware with per-update faults, raw Phoenix
 * sockets for devices the test answers for itself, and groups matched by identifier.
 */
import path from 'node:path';
import { Readable } from 'node:stream';
import { DeviceClient, type UpdateFaults } from '../../device-client/index.ts';
import { uploadFirmwareStream } from '../../server/cli/firmware.ts';
import { imageChunks } from '../firmware/harness.ts';
import { joinChannel, openSocket } from '../helpers/phoenix.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import type { TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';

export interface Release {
  id: string;
  version: string;
}

/** Uploads a 16 KiB image of `version` to the test server's product. */
export async function uploadRelease(server: TestServer, version: string, seed: number): Promise<Release> {
  return (await uploadFirmwareStream({
    client: { url: server.apiUrl, token: server.adminToken },
    query: { product: server.productId, version },
    source: Readable.from(imageChunks(16 * 1024, seed)),
    size: 16 * 1024,
  })) as Release;
}

const socketUrl = (server: TestServer) => `${server.deviceUrl.replace(/^https/, 'wss')}/socket`;

/**
 * Starts real devices `names` running `base` (their clients pushed onto `clients`, for the caller
 * to stop), and waits until all are online. `faults(i, n)` injects faults into device i's n-th
 * update (1-based).
 */
export async function startDevices(
  server: TestServer,
  o: {
    names: string[];
    base: Release;
    stateDir: string;
    clients: DeviceClient[];
    faults?: (i: number, n: number) => UpdateFaults | undefined;
    kbps?: number;
  },
): Promise<void> {
  const pki = await getTestPki();
  await Promise.all(
    o.names.map(async (name, i) => {
      const cred = await deviceCert(name);
      let updates = 0;
      const client = new DeviceClient({
        url: socketUrl(server),
        tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
        stateDir: path.join(o.stateDir, name),
        firmware: { uuid: o.base.id, version: o.base.version },
        downloadRetryDelayMs: () => 50,
        faults: () => {
          const f = o.faults?.(i, ++updates);
          return o.kbps !== undefined ? { ...f, kbps: o.kbps } : f;
        },
      });
      o.clients.push(client);
      await client.start();
    }),
  );
  await until(
    async () =>
      (
        await server.database.db
          .selectFrom('devices')
          .select('id')
          .where('identifier', 'in', o.names)
          .where('connection_status', '=', 'online')
          .execute()
      ).length === o.names.length,
    `${o.names.length} devices online (${o.names[0]}…)`,
    60_000,
  );
}

/** A raw Phoenix socket of device `name`, joined on `device:<base>`: the test answers its pushes. */
export async function rawDevice(server: TestServer, name: string, base: Release) {
  const pki = await getTestPki();
  const cred = await deviceCert(name);
  const socket = await openSocket(socketUrl(server), {
    tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
  });
  const channel = socket.channel(`device:${base.id}`, {});
  await joinChannel(channel);
  return { socket, channel };
}

/** A group of the default product whose members are the devices matching `match`. */
export async function matchGroup(server: TestServer, name: string, match: string): Promise<string> {
  const api = `/api/v1/orgs/${server.orgId}`;
  const g = await server.call<{ id: string }>('POST', `${api}/groups`, { product: 'default', name });
  await server.call('POST', `${api}/groups/${g.id}/devices`, { match });
  return g.id;
}
