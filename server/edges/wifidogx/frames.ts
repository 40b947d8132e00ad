/**
 * What the WiFiDogX gateway can read (pure): its hand-written reader has a 1024-byte buffer and
 * handles one frame per read, so every server frame stays under 1000 bytes on the wire (header
 * included), unfragmented and uncompressed. Messages that cannot fit are split where the
 * protocol allows it (gateway lists) or refused — never sent oversize.
 */
import semver from 'semver';

/** Largest frame (WebSocket header + payload) the server writes to a gateway. */
export const MAX_FRAME_BYTES = 1000;

/** Bytes of a server→client frame header for a payload of `n` bytes (no mask). */
export function frameHeaderBytes(n: number): number {
  return n < 126 ? 2 : n < 65_536 ? 4 : 10;
}

/** The encoded message, or undefined when its frame would reach MAX_FRAME_BYTES. */
export function encodeFrame(message: Record<string, unknown>): Buffer | undefined {
  const payload = Buffer.from(JSON.stringify(message));
  return payload.length + frameHeaderBytes(payload.length) < MAX_FRAME_BYTES ? payload : undefined;
}

export interface GatewaySetting {
  gw_id: string;
  auth_mode: number;
}

/**
 * The `connect`/`heartbeat` reply, split into as many messages as needed so each frame fits
 * (each carries a subset of the gateways; the gateway applies each entry on its own). A single
 * gateway entry too large for any frame is left out and reported.
 */
export function gatewayReplies(
  type: string,
  reqId: string | undefined,
  gateways: GatewaySetting[],
): { frames: Buffer[]; dropped: string[] } {
  const base = (list: GatewaySetting[]) => ({
    type,
    op: type,
    ...(reqId !== undefined ? { req_id: reqId } : {}),
    gateway: list,
  });
  const frames: Buffer[] = [];
  const dropped: string[] = [];
  let current: GatewaySetting[] = [];
  for (const gw of gateways) {
    const trial = encodeFrame(base([...current, gw]));
    if (trial) {
      current.push(gw);
      continue;
    }
    if (current.length) frames.push(encodeFrame(base(current))!);
    current = [];
    if (encodeFrame(base([gw]))) current = [gw];
    else dropped.push(gw.gw_id);
  }
  if (current.length || frames.length === 0) {
    const last = encodeFrame(base(current));
    if (last) frames.push(last);
  }
  return { frames, dropped };
}

/**
 * URLs sent in `firmware_upgrade` go unescaped into a shell command on the gateway: only
 * scheme, host, port and path segments of `[A-Za-z0-9._~-]`, no query, under 500 characters.
 */
const SAFE_URL = /^https?:\/\/[A-Za-z0-9.-]+(?::\d{1,5})?(?:\/[A-Za-z0-9._~-]+)*\/?$/;
export const MAX_URL_LENGTH = 500;

export function isSafeFirmwareUrl(url: unknown): url is string {
  return typeof url === 'string' && url.length < MAX_URL_LENGTH && SAFE_URL.test(url);
}

/**
 * The fleet version of a gateway's `/etc/openwrt_release` (firmware_info_response data):
 * DISTRIB_RELEASE when it is a semantic version, else its numbers padded to x.y.z with the rest
 * as a pre-release (`24.10-SNAPSHOT` → `24.10.0-SNAPSHOT`); DISTRIB_REVISION, when present,
 * becomes build metadata (`+r28790-abc123`). Operators upload images under that version.
 */
export function gatewayVersion(data: unknown): string | undefined {
  if (typeof data !== 'object' || data === null) return undefined;
  const d = data as Record<string, unknown>;
  const release = typeof d.DISTRIB_RELEASE === 'string' ? d.DISTRIB_RELEASE.trim() : '';
  if (!release) return undefined;
  let version: string;
  if (semver.valid(release) && !release.includes('+')) version = release;
  else {
    const m = /^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?[-_.]?(.*)$/.exec(release);
    if (!m) return undefined;
    const pre = (m[4] ?? '').replace(/[^0-9A-Za-z.-]+/g, '-').replace(/^[-.]+|[-.]+$/g, '');
    version = `${Number(m[1])}.${Number(m[2] ?? 0)}.${Number(m[3] ?? 0)}${pre ? `-${pre}` : ''}`;
  }
  const revision =
    typeof d.DISTRIB_REVISION === 'string'
      ? d.DISTRIB_REVISION.replace(/[^0-9A-Za-z.-]+/g, '-').replace(/^[-.]+|[-.]+$/g, '')
      : '';
  const full = revision ? `${version}+${revision}` : version;
  return semver.valid(full) ? full : undefined;
}
