/**
 * The operator dashboard at `/` on the API listener: plain ES modules from `static/`, no build
 * step. The page talks to the REST API (`/api/v1`) with the operator's JWT and listens on the
 * operator socket (`/socket`, topic `operator:<orgId>`) through the official phoenix client,
 * which is served from the installed `phoenix` package rather than copied.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import helmet from '@fastify/helmet';
import type { FastifyInstance, FastifyReply } from 'fastify';

/** Where the page's modules and stylesheet are served (the page names them with this prefix). */
export const DASHBOARD_ASSETS = '/ui';

/** The dashboard's own Content-Security-Policy: same-origin scripts, styles and fetches, WebSockets for the live view. */
export const DASHBOARD_CSP_DIRECTIVES = {
  defaultSrc: ["'self'"],
  scriptSrc: ["'self'"],
  styleSrc: ["'self'"],
  imgSrc: ["'self'", 'data:'],
  connectSrc: ["'self'", 'ws:', 'wss:'],
  objectSrc: ["'none'"],
  baseUri: ["'none'"],
  formAction: ["'self'"],
  frameAncestors: ["'none'"],
};

const STATIC_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'static');
const CONTENT_TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
};

interface Asset {
  body: Buffer;
  type: string;
}

/** Reads the static files once: they are small, and a fixed map means no path from the URL ever reaches the file system. */
function loadAssets(): Map<string, Asset> {
  const assets = new Map<string, Asset>();
  for (const name of readdirSync(STATIC_DIR)) {
    const type = CONTENT_TYPES[path.extname(name)];
    if (type) assets.set(name, { body: readFileSync(path.join(STATIC_DIR, name)), type });
  }
  return assets;
}

/** The official phoenix client's ES module, from the installed package (`priv/static/phoenix.mjs`). */
function phoenixModule(): Asset {
  const main = createRequire(import.meta.url).resolve('phoenix');
  return { body: readFileSync(path.join(path.dirname(main), 'phoenix.mjs')), type: CONTENT_TYPES['.mjs']! };
}

function send(reply: FastifyReply, asset: Asset, cache: string): FastifyReply {
  return reply.header('content-type', asset.type).header('cache-control', cache).send(asset.body);
}

/**
 * Serves the dashboard: `GET /` (the page, with a strict CSP), `GET /ui/<file>` (its modules and
 * stylesheet) and `GET /ui/vendor/phoenix.mjs`. Register it on the API listener after
 * `registerApi` and `registerOperatorSocket`.
 */
export async function registerDashboard(app: FastifyInstance): Promise<void> {
  const prefix = DASHBOARD_ASSETS;
  const assets = loadAssets();
  const html = assets.get('index.html');
  if (!html)
    throw new Error(`the dashboard page is missing: ${path.join(STATIC_DIR, 'index.html')}; reinstall fleethub`);
  const phoenix = phoenixModule();

  const hidden = { schema: { hide: true } };
  // The dashboard's routes in a scope of their own: helmet's headers (and its strict CSP) on them
  // only, not on the API's JSON nor on the OpenAPI UI, which needs inline scripts.
  await app.register(async (scope) => {
    await scope.register(helmet, {
      // Only these directives: helmet's defaults add upgrade-insecure-requests, which breaks a plain-HTTP listener.
      contentSecurityPolicy: { useDefaults: false, directives: DASHBOARD_CSP_DIRECTIVES },
      frameguard: { action: 'deny' },
      referrerPolicy: { policy: 'no-referrer' },
      // HSTS belongs to whoever terminates TLS for the API listener (it may be plain HTTP behind a proxy).
      strictTransportSecurity: false,
    });
    // Revalidate the page each time so a server upgrade reaches operators on their next load.
    scope.get('/', hidden, async (_request, reply) => send(reply, html, 'no-cache'));
    scope.get(`${prefix}/vendor/phoenix.mjs`, hidden, async (_request, reply) => send(reply, phoenix, 'no-cache'));
    scope.get<{ Params: { file: string } }>(`${prefix}/:file`, hidden, async (request, reply) => {
      const asset = request.params.file === 'index.html' ? undefined : assets.get(request.params.file);
      if (!asset) return reply.status(404).header('content-type', 'text/plain; charset=utf-8').send('not found');
      return send(reply, asset, 'no-cache');
    });
  });
}
