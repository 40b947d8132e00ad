/**
 * The Main Server edge: `/api/main-server/*` on the API listener, operator routes in
 * `/api/v1/main-server/*`, and the heartbeat sweep (offline 180 s after the last heartbeat).
 *
 * Wiring (server/main.ts):
 *   const mainServer = await registerMainServer(api, { fleet, blobs, log });   // after registerApi
 *   registerApi(api, deps, [..., mainServerApiPlugin({ fleet, blobs })]);     // operator routes
 *   ... mainServer.close() on shutdown.
 */
import type { FastifyInstance } from 'fastify';
import type { RoutePlugin } from '../../http/errors.ts';
import type { BlobStore } from '../../firmware/blob-store.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { productResolver } from '../../fleet/orgs.ts';
import type { Logger } from '../../log.ts';
import { mainServerAdminRoutes } from './admin.ts';
import { mainServerRoutes } from './routes.ts';
import { sweepSilentDevices } from '../../fleet/device-link.ts';

export { MAIN_SERVER_PREFIX } from './routes.ts';
export {
  createZip,
  readPackageBuffer,
  readPackageFile,
  parseManifest,
  isCompatible,
  MANIFEST_NAME,
  PACKAGE_FORMAT,
  type PackageManifest,
} from '../../../shared/main-server-package.ts';
/** Marks Main Server devices offline 180 s (`offlineAfterMs`) after their last heartbeat. */
export function sweepOfflineDevices(fleet: FleetContext, offlineAfterMs: number): Promise<number> {
  return sweepSilentDevices(fleet, 'main-server', offlineAfterMs);
}

export interface MainServerOptions {
  fleet: FleetContext;
  blobs: BlobStore;
  log?: Logger;
  /** Org and product (name or id) Main Server devices belong to; default `default`/`default`. */
  org?: string;
  product?: string;
  /** Offline this long after the last heartbeat (default 180 000 ms). */
  offlineAfterMs?: number;
  /** How often the offline sweep runs (default 30 000 ms; 0: never, tests call `sweepOfflineDevices`). */
  sweepIntervalMs?: number;
  /** Public base URL of the API listener for `package_path` / download URLs (default: the request's origin). */
  publicUrl?: string;
}

export interface MainServerEdge {
  close(): Promise<void>;
}

export const DEFAULT_OFFLINE_AFTER_MS = 180_000;

/** Mounts `/api/main-server` on the API listener's root instance (after `registerApi`, before `listen`). */
export async function registerMainServer(api: FastifyInstance, options: MainServerOptions): Promise<MainServerEdge> {
  const tenant = productResolver(options.fleet, options.org, options.product);
  await mainServerRoutes(api, { fleet: options.fleet, blobs: options.blobs, tenant, publicUrl: options.publicUrl });
  const offlineAfterMs = options.offlineAfterMs ?? DEFAULT_OFFLINE_AFTER_MS;
  const interval = options.sweepIntervalMs ?? 30_000;
  const timer =
    interval > 0
      ? setInterval(() => {
          sweepOfflineDevices(options.fleet, offlineAfterMs).catch((err: unknown) =>
            options.log?.error({ err }, 'main-server offline sweep failed'),
          );
        }, interval)
      : undefined;
  timer?.unref();
  return {
    async close() {
      if (timer) clearInterval(timer);
    },
  };
}

/** The operator routes (`/api/v1/main-server/...`) as a `RoutePlugin` for `registerApi`. */
export function mainServerApiPlugin(
  options: Pick<MainServerOptions, 'fleet' | 'blobs' | 'org' | 'product'> & { maxPackageBytes?: number },
): RoutePlugin {
  const tenant = productResolver(options.fleet, options.org, options.product);
  return (api) =>
    mainServerAdminRoutes(api, {
      fleet: options.fleet,
      blobs: options.blobs,
      tenant,
      maxPackageBytes: options.maxPackageBytes,
    });
}
