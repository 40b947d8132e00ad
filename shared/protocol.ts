/**
 * Fleet protocol constants and payload types shared by the server and the device client: the
 * topics, events and payloads of the Phoenix device socket.
 */

export const DEVICE_TOPIC_PREFIX = 'device:';
export const GROUP_TOPIC_PREFIX = 'group:';

/** `device:<firmware_uuid>` — the uuid of the firmware the device runs, never its identity. */
export function deviceTopic(firmwareUuid: string): string {
  return `${DEVICE_TOPIC_PREFIX}${firmwareUuid}`;
}

/** `group:<org>:<product>:<group>`. */
export function groupTopic(org: string, product: string, group: string): string {
  return `${GROUP_TOPIC_PREFIX}${org}:${product}:${group}`;
}

export const Events = {
  firmwareUpdate: 'firmware_update',
  /** server → device: stop the update to `version` (its deployment was aborted); see `UpdateCancelledPayload`. */
  updateCancelled: 'update_cancelled',
  join: 'join',
  leave: 'leave',
  updateBegin: 'firmware_update_begin',
  updateProgress: 'firmware_update_progress',
  updateFinish: 'firmware_update_finish',
  updateError: 'firmware_update_error',
  reboot: 'reboot',
  identify: 'identify',
  requestLogs: 'request_logs',
} as const;

/** Join params of `device:<uuid>`: metadata for firmware the server does not know yet. */
export interface DeviceJoinParams {
  version?: string;
  platform?: string;
  architecture?: string;
  product?: string;
}

export interface DeviceJoinReply {
  groups: string[];
}

/** server → device: update to this firmware (ignored when already running `version`). */
export interface FirmwareUpdatePayload {
  url: string;
  version: string;
  sha256: string;
  size: number;
  /** Detached ed25519 signature of the image, base64. */
  signature?: string;
  /** The uuid to join `device:<uuid>` with after installing. */
  firmware_uuid: string;
}

/** server → device: the update to `version` is cancelled; a device mid-download stops and stays on what it runs. */
export interface UpdateCancelledPayload {
  version: string;
  firmware_uuid: string;
  reason: string;
}

export interface ChannelMembershipPayload {
  channel: string;
}

export interface UpdateBeginPayload {
  version: string;
}

export interface UpdateProgressPayload {
  version: string;
  percent: number;
  bytes: number;
  total: number;
}

export interface UpdateFinishPayload {
  version: string;
}

export interface UpdateErrorPayload {
  version: string;
  errors: string[];
}

/** Default listener ports. */
export const DEFAULT_PORTS = { api: 4000, device: 4001, keyauth: 4002 } as const;

/** Path of the Phoenix socket on the device listener (the client appends `/websocket`). */
export const DEVICE_SOCKET_PATH = '/socket';
