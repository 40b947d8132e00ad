/**
 * The floor: what Node itself costs, with nothing of fleethub. One mutual-TLS HTTPS server
 * (same server certificate, same client-certificate verification, TLS 1.3) with
 *   - a raw `ws` WebSocketServer holding bare connections (no protocol, no state), and
 *   - `GET /firmware` streaming a file with `fs.createReadStream`.
 * Driven over IPC by bench/run.ts. Run with `--expose-gc`.
 */
import { createReadStream, statSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { randomBytes } from 'node:crypto';
import { WebSocketServer, type WebSocket } from 'ws';
import { loadPki } from '../certs/pki.ts';
import { nowMs, serveRpc } from './lib/ipc.ts';
import { residentByMapping } from './lib/smaps.ts';

const pki = loadPki(process.env.BENCH_PKI_DIR!);
const firmwareFile = process.env.BENCH_FIRMWARE_FILE;

const server = https.createServer(
  {
    cert: pki.server.certPem,
    key: pki.server.keyPem,
    ca: [pki.rootCa.certPem, pki.signerCa.certPem],
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: 'TLSv1.3',
    ticketKeys: randomBytes(48),
    sessionTimeout: 300,
  },
  (req, res) => {
    if (req.url !== '/firmware' || !firmwareFile) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': statSync(firmwareFile).size });
    createReadStream(firmwareFile).pipe(res);
  },
);
const wss = new WebSocketServer({ server, perMessageDeflate: false, maxPayload: 1024 * 1024 });
const clients = new Set<WebSocket>();
wss.on('connection', (ws) => {
  clients.add(ws);
  ws.on('close', () => clients.delete(ws));
  ws.on('error', () => undefined);
});

await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
const gc = (globalThis as { gc?: () => void }).gc;
let peakRss = 0;
let rssTimer: NodeJS.Timeout | undefined;

serveRpc({
  memory() {
    gc?.();
    gc?.();
    const m = process.memoryUsage();
    return {
      rss: m.rss,
      heapUsed: m.heapUsed,
      heapTotal: m.heapTotal,
      external: m.external,
      arrayBuffers: m.arrayBuffers,
      mappings: residentByMapping(),
      sockets: clients.size,
    };
  },
  /** One frame of `bytes` (sequence number first), the same Buffer written to every connection. */
  broadcast(request) {
    const frame = Buffer.alloc(Number(request.bytes), 0x61);
    frame.writeUInt32BE(Number(request.seq), 0);
    const t0 = nowMs();
    for (const ws of clients) ws.send(frame, { binary: false });
    return { t0, done: nowMs(), sent: clients.size };
  },
  sampleRss(request) {
    if (request.on) {
      peakRss = process.memoryUsage().rss;
      rssTimer = setInterval(() => (peakRss = Math.max(peakRss, process.memoryUsage().rss)), 100);
      return null;
    }
    clearInterval(rssTimer);
    return { peakRss };
  },
  closeAll() {
    for (const ws of clients) ws.terminate();
    return null;
  },
  stop() {
    setImmediate(() => process.exit(0));
    return null;
  },
});

process.send?.({ ready: true, port: (server.address() as AddressInfo).port });
