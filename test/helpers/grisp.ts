/** GRiSP test helpers shared by test/edges/grisp*.test.ts. */
import { buildGrispPackage } from '../../device-client/simulators/grisp.ts';
import type { TestServer } from './server.ts';

/** Uploads a GRiSP package (the simulator's format) of `version` with `blocks`; the answer's status and body. */
export async function uploadGrispPackage(server: TestServer, version: string, blocks: Buffer[]) {
  const body = await buildGrispPackage({ version, blocks });
  const res = await fetch(
    `${server.apiUrl}/api/v1/grisp/firmware?product=${server.productId}&org=${server.orgId}&version=${version}`,
    {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
      body: new Uint8Array(body),
    },
  );
  return { status: res.status, body: (await res.json()) as { id: string; format: string; members: number } };
}

/** A device's update attempts, newest first. */
export async function attemptsOf(server: TestServer, deviceId: string) {
  return server.database.db
    .selectFrom('update_attempts')
    .selectAll()
    .where('device_id', '=', deviceId)
    .orderBy('created_at', 'desc')
    .execute();
}
