/**
 * A fleethub cluster in one test process: full servers (`startServer`) on ephemeral ports, each
 * with its own pool and its own PgAdapter, all on ONE PostgreSQL schema — the shape of
 * docker-compose.yml's two nodes, minus the load balancer.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PgAdapter } from '../../server/channels/index.ts';
import { loadConfig, type Config } from '../../server/config.ts';
import { openDatabase, type DatabaseHandle } from '../../server/db/index.ts';
import { createLogger } from '../../server/log.ts';
import { startServer, type RunningServer } from '../../server/main.ts';
import { createTestDatabase } from '../helpers/db.ts';
import { getTestPki } from '../helpers/pki.ts';

export interface ClusterNode extends RunningServer {
  adapter: PgAdapter;
  /** `wss://localhost:<port>/socket` on this node's mutual-TLS device listener. */
  socketUrl: string;
}

export interface Cluster {
  nodes: ClusterNode[];
  /** The schema every node shares. */
  schema: string;
  close(): Promise<void>;
}

/** Starts `count` nodes one after the other (the first migrates and bootstraps the default tenant). */
export async function startCluster(count: number, overrides: Partial<Config> = {}): Promise<Cluster> {
  const databaseUrl = process.env.DATABASE_URL;
  if (!databaseUrl) throw new Error('CLUSTER_NEEDS_POSTGRES: set DATABASE_URL=postgres://… to start a cluster');
  const pki = await getTestPki();
  const shared = await createTestDatabase();
  const schema = shared.schema!;
  // Nodes of one cluster share the signing secret (signed firmware URLs and JWTs work on any node).
  const secret = `cluster-secret-${Math.random().toString(36).slice(2)}`;
  // One data directory for all, like a shared volume: a blob uploaded to one node downloads from any.
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-cluster-'));
  const nodes: ClusterNode[] = [];
  const handles: DatabaseHandle[] = [];
  const closeAll = async () => {
    for (const node of nodes.reverse()) await node.close().catch(() => undefined);
    for (const handle of handles) await handle.close().catch(() => undefined);
    await shared.close();
    rmSync(dataDir, { recursive: true, force: true });
  };
  try {
    for (let i = 0; i < count; i++) {
      const nodeName = `node-${String.fromCharCode(97 + i)}-${process.pid}`;
      const config = loadConfig(
        [],
        {},
        {
          dataDir,
          certsDir: pki.dir,
          host: '127.0.0.1',
          apiPort: 0,
          devicePort: 0,
          keyauthPort: 0,
          devicePublicUrl: 'https://localhost:0',
          databaseUrl,
          nodeName,
          secret,
          logLevel: process.env.FLEETHUB_TEST_LOG_LEVEL ?? 'silent',
          allowedOrigins: ['*'],
          ...overrides,
        },
      );
      const log = createLogger({ level: config.logLevel });
      // Each node its own pool, as separate processes would have.
      const database =
        i === 0 ? shared : await openDatabase({ databaseUrl, dataDir: 'memory://', schema, poolSize: 5 });
      if (i > 0) handles.push(database);
      const adapter = new PgAdapter({
        connectionString: databaseUrl,
        db: database.db,
        schema,
        nodeName,
        log: log.child({ component: 'pg-adapter' }),
      });
      const server = await startServer(config, { database, log, pubsubAdapter: adapter });
      nodes.push({ ...server, adapter, socketUrl: `${server.deviceUrl.replace(/^https/, 'wss')}/socket` });
      // startServer does not wait for LISTEN; a test must not publish before every node hears.
      await server.pubsub.ready;
    }
  } catch (err) {
    await closeAll();
    throw err;
  }
  return { nodes, schema, close: closeAll };
}
