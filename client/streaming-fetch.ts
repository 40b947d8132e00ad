/**
 * A `fetch` over node:http / node:https for streamed uploads through the generated client:
 * `createFleethubClient({ url, token, fetch: streamingFetch })`. Node's own fetch (undici, Node 20)
 * keeps every chunk of a streamed request body until the request ends — a 400 MiB image grows
 * the process by about 420 MiB — while node:http writes a chunk only once the socket drained the
 * one before, so an upload holds a few chunks whatever the image's size. Answers are ordinary
 * `Response`s; the server may answer (401, 409) before the body is sent, and that answer wins.
 */
import http from 'node:http';
import https from 'node:https';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { ReadableStream as NodeReadableStream } from 'node:stream/web';

export async function streamingFetch(input: Request | string | URL, init?: RequestInit): Promise<Response> {
  const request = input instanceof Request ? input : new Request(input, init);
  const url = new URL(request.url);
  const headers: Record<string, string> = {};
  request.headers.forEach((value, name) => {
    headers[name] = value;
  });
  const outgoing = (url.protocol === 'https:' ? https : http).request(url, { method: request.method, headers });
  const answered = new Promise<http.IncomingMessage>((resolve, reject) => {
    outgoing.once('response', resolve);
    outgoing.once('error', reject);
  });
  // A body that cannot be sent (the server answered early and closed) is not an error of its own.
  const body = request.body ? Readable.fromWeb(request.body as NodeReadableStream<Uint8Array>) : undefined;
  const sending = body ? pipeline(body, outgoing).catch(() => undefined) : Promise.resolve(outgoing.end());
  const res = await answered;
  const chunks: Buffer[] = [];
  for await (const chunk of res) chunks.push(chunk as Buffer);
  body?.destroy(); // answered: what is left of the body is not sent
  await sending;
  const responseHeaders = new Headers();
  for (const [name, value] of Object.entries(res.headers))
    for (const v of Array.isArray(value) ? value : value === undefined ? [] : [value]) responseHeaders.append(name, v);
  const status = res.statusCode ?? 0;
  return new Response(status === 204 || status === 304 ? null : Buffer.concat(chunks), {
    status,
    statusText: res.statusMessage,
    headers: responseHeaders,
  });
}
