// The live view: the official phoenix client on the operator socket (`/socket` on this origin).
// The token travels in the `base64url.bearer.phx.<token>` subprotocol (phoenix's `authToken`),
// never in the URL. One channel at a time: `operator:<orgId>` of the org on screen.
import { Socket } from './vendor/phoenix.mjs';

/** Everything the domain publishes on `operator:<orgId>` (server/fleet). */
export const OPERATOR_EVENTS = [
  'device_status',
  'device_registered',
  'device_approved',
  'device_revoked',
  'update_transition',
  'target_changed',
  'group_deleted',
  'firmware_created',
];

export class Live {
  #socket;
  #channel = null;
  #listeners = new Set();
  #statusListeners = new Set();

  constructor(token) {
    this.#socket = new Socket('/socket', {
      authToken: token,
      reconnectAfterMs: (tries) => [500, 1000, 2000, 5000][tries - 1] ?? 10000,
    });
    this.#socket.onOpen(() => this.#status(this.#channel ? 'joining' : 'connected'));
    this.#socket.onError(() => this.#status('reconnecting'));
    this.#socket.onClose(() => this.#status('reconnecting'));
    this.#socket.connect();
  }

  /** Listens to `operator:<orgId>` instead of the previous org. */
  watch(orgId) {
    if (this.#channel?.topic === `operator:${orgId}`) return;
    this.#channel?.leave();
    const channel = this.#socket.channel(`operator:${orgId}`, {});
    for (const event of OPERATOR_EVENTS) channel.on(event, (payload) => this.#emit(event, payload));
    // phoenix rejoins after reconnects; each successful join may follow missed events.
    channel
      .join()
      .receive('ok', () => {
        this.#status('live');
        this.#emit('resync', {});
      })
      .receive('error', (response) => this.#status(`refused: ${response?.reason ?? 'unknown reason'}`));
    channel.onError(() => this.#status('reconnecting'));
    this.#channel = channel;
    this.#status('joining');
  }

  /** `fn(event, payload)` for every operator event; returns an unsubscribe function. */
  on(fn) {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }

  /** `fn(status)`: 'joining' | 'live' | 'reconnecting' | 'refused: …'. */
  onStatus(fn) {
    this.#statusListeners.add(fn);
  }

  close() {
    this.#channel?.leave();
    this.#socket.disconnect();
  }

  #emit(event, payload) {
    for (const fn of this.#listeners) fn(event, payload);
  }

  #status(status) {
    for (const fn of this.#statusListeners) fn(status);
  }
}
