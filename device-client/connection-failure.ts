/**
 * Why a device's connection attempt failed, for every simulated protocol and `connect`: a short
 * `kind` the simulator's summary counts by (`connection refused`, `unknown CA`, `HTTP 403`,
 * `not TLS`, `not the protocol`, ...) and a message for people.
 */
import type http from 'node:http';

/** Why a connection attempt failed: a short `kind` to count by, and a message for people. */
export interface ConnectionFailure {
  kind: string;
  message: string;
}

/** `unknown CA: HTTP 403: client certificate issuer is ...` (the kind first, unless the message starts with it). */
export function formatConnectionFailure(f: ConnectionFailure): string {
  return f.message.toLowerCase().startsWith(f.kind.toLowerCase()) ? f.message : `${f.kind}: ${f.message}`;
}

/** The server's reason in an HTTP error body: `error.message` or `error` or `reason` of JSON, else the text. */
export function refusalReason(body: string, statusMessage?: string): string {
  try {
    const parsed = JSON.parse(body) as {
      error?: { message?: unknown } | string;
      reason?: unknown;
      message?: unknown;
      details?: unknown;
    };
    const error = parsed.error;
    if (typeof error === 'object' && typeof error?.message === 'string') return error.message;
    if (typeof error === 'string') {
      const detail = typeof parsed.details === 'string' ? parsed.details : parsed.message;
      return typeof detail === 'string' && detail ? `${error}: ${detail}` : error;
    }
    if (typeof parsed.reason === 'string') return parsed.reason;
    if (typeof parsed.message === 'string') return parsed.message;
  } catch {
    // not JSON: the text itself
  }
  return body.trim().slice(0, 300) || statusMessage || 'no reason given';
}

/** Reads the body of a refused request (at most 4 KiB, at most 2 s) and resolves to its status and reason. */
export function readRefusal(res: http.IncomingMessage): Promise<{ status: number; reason: string }> {
  const status = res.statusCode ?? 0;
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      res.destroy();
      resolve({ status, reason: refusalReason(Buffer.concat(chunks).toString('utf8'), res.statusMessage) });
    };
    const timer = setTimeout(finish, 2000);
    res.on('data', (chunk: Buffer) => {
      if (size < 4096) chunks.push(chunk);
      size += chunk.length;
    });
    res.once('end', finish);
    res.once('error', finish);
    res.once('close', finish);
  });
}

/** An HTTP answer that refused the device, with the server's reason. */
export function httpRefusal(status: number, reason: string): ConnectionFailure {
  const message = `HTTP ${status}: ${reason}`;
  if (/not a registered signer CA|UNABLE_TO_GET_ISSUER|UNABLE_TO_VERIFY_LEAF/.test(reason))
    return { kind: 'unknown CA', message };
  if (/CERT_HAS_EXPIRED|certificate (has )?expired/i.test(reason)) return { kind: 'certificate expired', message };
  if (/not valid yet|CERT_NOT_YET_VALID/.test(reason)) return { kind: 'certificate not yet valid', message };
  if (/self-signed/.test(reason)) return { kind: 'self-signed certificate', message };
  if (/revoked/.test(reason)) return { kind: 'revoked', message };
  return { kind: `HTTP ${status}`, message };
}

/** The port answered, but not in the protocol the device speaks (`what` says what it answered). */
export function notTheProtocol(protocol: string, what: string): ConnectionFailure {
  return { kind: 'not the protocol', message: `the port does not speak ${protocol}: ${what}; is it the right port?` };
}

/** Up to 60 printable characters of what a port answered, for a `notTheProtocol` message. */
export function quoteAnswer(data: string | Buffer): string {
  const text = (typeof data === 'string' ? data : data.toString('latin1')).split(/\r?\n|\r/)[0] ?? '';
  const printable = text.replace(/[^\x20-\x7e]/g, '.').slice(0, 60);
  return printable ? JSON.stringify(printable) : `${data.length} byte(s)`;
}

const SERVER_CERT_UNTRUSTED = new Set([
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
]);

/**
 * Explains a socket or TLS error (also one wrapped as `{ error }`, as phoenix reports it, or as
 * `cause`, as fetch throws it): a TLS alert from the server, our own verification of the server's
 * certificate, a port that does not speak TLS, or a socket error (refused, reset, unknown host).
 */
export function describeError(event: unknown): ConnectionFailure {
  let err = ((event as { error?: unknown } | null)?.error ?? event) as NodeJS.ErrnoException & {
    address?: string;
    port?: number;
    cause?: unknown;
  };
  // fetch: TypeError('fetch failed', { cause: <the socket's error> })
  if (err instanceof TypeError && err.cause && typeof err.cause === 'object') err = err.cause as typeof err;
  const code = typeof err?.code === 'string' ? err.code : '';
  const text = err instanceof Error ? err.message : String((event as { message?: unknown })?.message ?? event);
  const alert = /^ERR_SSL_(?:TLSV1|SSLV3|TLSV13)_ALERT_(.+)$/.exec(code)?.[1];
  if (alert) {
    const name = alert
      .toLowerCase()
      .replace(/_/g, ' ')
      .replace(/\bca\b/, 'CA');
    return { kind: name, message: `TLS alert from the server: ${name} (${code})` };
  }
  if (SERVER_CERT_UNTRUSTED.has(code))
    return {
      kind: 'unknown CA',
      message: `the server's certificate is not signed by the CA given to the device (${code})`,
    };
  if (code === 'CERT_HAS_EXPIRED')
    return { kind: 'certificate expired', message: `the server's certificate has expired (${code})` };
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return { kind: 'wrong host name', message: text };
  if (
    code === 'ERR_SSL_WRONG_VERSION_NUMBER' ||
    code === 'ERR_SSL_PACKET_LENGTH_TOO_LONG' ||
    (code === 'EPROTO' && /wrong version number|packet length too long|http request/.test(text))
  )
    return { kind: 'not TLS', message: `the port does not speak TLS (${code}); is it the device port?` };
  const where = err?.address ? ` (${err.address}${err.port ? `:${err.port}` : ''})` : '';
  switch (code) {
    case 'ECONNREFUSED':
      return { kind: 'connection refused', message: `connection refused${where}: is the server running on that port?` };
    case 'ECONNRESET':
      return { kind: 'connection reset', message: `the server reset the connection${where}` };
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return { kind: 'host not found', message: text };
    case 'ETIMEDOUT':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return { kind: 'unreachable', message: text };
    case 'UND_ERR_SOCKET':
      return {
        kind: 'connection closed',
        message: `the server closed the connection without an HTTP answer${where}; is it the right port?`,
      };
    case 'HPE_INVALID_CONSTANT':
    case 'HPE_INVALID_VERSION':
    case 'HPE_INVALID_STATUS':
      return { kind: 'not HTTP', message: `the port does not answer HTTP (${code}); is it the right port?` };
  }
  return { kind: code || 'other', message: text || 'unknown error' };
}
