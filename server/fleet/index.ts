/**
 * The fleet domain: orgs, products, devices, groups, firmware, targets, the update state machine
 * and the audit log. Plain async functions over a `FleetContext`; no transport code. Every
 * operator mutation takes an `Actor` and writes its audit record in the same transaction; events
 * are published through `ctx.bus` after the commit.
 *
 * Topics published:
 * - `device_id:<deviceId>`: `join {channel}`, `leave {channel}`, `firmware_update {...}`, `device_deleted {device_id}`,
 *   `device_revoked {device_id}`, `device_approved {device_id}`, `certificate_revoked {device_id, certificate_id}`,
 *   `connection_replaced {node, protocol}` (Phoenix device channels and the edges' links subscribe to it, and to
 *   their group topics; each node's device listener reads every device topic for the revocations)
 * - `group:<org>:<product>:<group>`: `firmware_update {url, version, sha256, size, signature?, firmware_uuid}`, `group_deleted {}`
 * - `operator:<orgId>`: `device_status`, `update_transition`, `target_changed`, `group_deleted`, `firmware_created`
 */
export type { Actor } from '../audit.ts';
export { SYSTEM } from '../audit.ts';
export type { Device, Firmware, Group, UpdateAttempt, UpdateState, ConnectionStatus } from '../db/schema.ts';
export {
  inTransaction,
  observedBus,
  pubsubBus,
  Topics,
  DEVICE_TOPIC_PREFIX,
  type FleetBus,
  type FleetContext,
  type FleetEvent,
  type FleetObserver,
} from './context.ts';
export { FleetError, NAME_PATTERN, isUuid, validName, validVersion, type FleetErrorCode } from './errors.ts';
export {
  createOrg,
  listOrgs,
  getOrg,
  createProduct,
  listProducts,
  getProduct,
  productResolver,
  updateProduct,
  MAX_UPDATE_TIMEOUT_S,
  type ProductPatch,
  type Org,
  type Product,
} from './orgs.ts';
export {
  createDevice,
  listDevices,
  getDevice,
  updateDevice,
  deleteDevice,
  publishCertificateRevoked,
  deviceGroupTopics,
  deviceLinkState,
  selectDeviceIds,
  MAX_SELECTED_DEVICES,
  type CreateDeviceInput,
  type DeviceSelector,
  type DeviceFilter,
} from './devices.ts';
export type { Page } from './paging.ts';
export {
  createGroup,
  listGroups,
  getGroup,
  updateGroup,
  deleteGroup,
  addDevicesToGroup,
  removeDevicesFromGroup,
  listGroupMembers,
  isGroupMember,
  type CreateGroupInput,
  type GroupWithCount,
} from './groups.ts';
export {
  createFirmware,
  listFirmware,
  getFirmware,
  deleteFirmware,
  isBlobReferenced,
  type CreateFirmwareInput,
} from './firmware.ts';
export {
  setGroupTarget,
  clearGroupTarget,
  setDeviceTarget,
  clearDeviceTarget,
  resolveTarget,
  listTargets,
  type ResolvedTarget,
  type Target,
  type TargetChange,
} from './targets.ts';
export {
  applyUpdateReport,
  progressIngestStats,
  validateReport,
  firmwareUpdatePayload,
  sweepStaleUpdates,
  DEFAULT_UPDATE_TIMEOUT_S,
  type SweepOptions,
  listUpdateAttempts,
  countUpdateStates,
  OPEN_STATES,
  UPDATE_STATES,
  UPDATE_REPORT_EVENTS,
  type AttemptFilter,
  type DeviceRef,
  type UpdateReportEvent,
} from './updates.ts';
export {
  countDeviceTargetStates,
  DEVICE_TARGET_STATES,
  type DeviceTargetRow,
  type DeviceTargetState,
  listDeviceTargetStates,
} from './device-states.ts';
export { installs, PROTOCOL_INSTALLS, type ProtocolInstalls } from './formats.ts';
export { deviceJoined, deviceDisconnected, type ConnectedDevice, type JoinOutcome } from './connections.ts';
export {
  linkEvent,
  linkEventOrThrow,
  linkNotice,
  replaceConnection,
  revocationOf,
  openLink,
  CONNECTION_REPLACED,
  UPDATE_TIMER,
  type LinkClose,
  type LinkEffect,
  type LinkEvent,
  type LinkRefusal,
  type LinkReport,
  type LinkResult,
  type LinkSession,
  type ReportKind,
  type RunningReport,
} from './device-link.ts';
export {
  FINAL_STATES,
  isAllowedEventMove,
  isAllowedTransition,
  TRANSITIONS,
  transitionOf,
  UNFINISHED_STATES,
  type AttemptEvent,
} from './link-table.ts';
export { markNodeAlive, removeNode, reconcileOfflineDevices } from './nodes.ts';
export {
  fleetStatus,
  FAILED_UPDATE_STATES,
  STATUS_FAILURES_SHOWN,
  type FailingDevice,
  type FleetStatus,
  type ResolvedTargetCount,
} from './status.ts';
export { listAuditLog, type AuditFilter, type AuditRecord } from './audit-log.ts';
