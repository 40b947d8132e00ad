import tls from 'node:tls';
import WebSocket from 'ws';
import type { CertifiedKey } from '../helpers/pki.ts';

export interface WsAttempt {
  /** 101 when the upgrade succeeded, otherwise the HTTP status the server answered. */
  status: number;
  /** The first message the server sent after the upgrade. */
  message?: unknown;
  /** The HTTP body of a refused upgrade. */
  body?: string;
  sessionReused: boolean;
  /** The subprotocol the server selected. */
  protocol?: string;
  /** A TLS session to resume with, when the server issued a ticket. */
  session?: Buffer;
}

/**
 * Opens a WebSocket over TLS to `url` with the given client credentials (or none), as a device
 * would, and reports how the handshake ended. The socket is closed before resolving.
 */
export function wsAttempt(
  url: string,
  ca: string,
  cred?: CertifiedKey,
  session?: Buffer,
  protocols?: string[],
): Promise<WsAttempt> {
  return new Promise((resolve, reject) => {
    let latestSession: Buffer | undefined;
    let tlsSocket: tls.TLSSocket | undefined;
    const ws = new WebSocket(url, protocols ?? [], {
      ca,
      ...(cred ? { cert: cred.certPem, key: cred.keyPem } : {}),
      ...(session ? { session } : {}),
      createConnection: (options: tls.ConnectionOptions) => {
        tlsSocket = tls.connect(options);
        tlsSocket.on('session', (s: Buffer) => (latestSession = s));
        return tlsSocket;
      },
    } as WebSocket.ClientOptions);
    ws.on('unexpected-response', (_req, res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => {
        const sessionReused = tlsSocket?.isSessionReused() ?? false;
        tlsSocket?.destroy();
        resolve({ status: res.statusCode ?? 0, body, sessionReused, session: latestSession });
      });
    });
    ws.on('message', (data) => {
      const sessionReused = tlsSocket?.isSessionReused() ?? false;
      ws.close();
      resolve({
        status: 101,
        message: JSON.parse(String(data)),
        sessionReused,
        session: latestSession,
        protocol: ws.protocol,
      });
    });
    ws.on('error', reject);
  });
}
