import type { ColumnType, Generated, Insertable, Selectable, Updateable } from 'kysely';

/**
 * Row types for every table. Edges add their own tables by module augmentation
 * (`declare module '../../db/schema.ts' { interface Database { ... } }`) beside their code.
 */
export interface Database {
  orgs: OrgsTable;
  products: ProductsTable;
  devices: DevicesTable;
  signer_cas: SignerCasTable;
  device_certificates: DeviceCertificatesTable;
  audit_log: AuditLogTable;
  groups: GroupsTable;
  group_devices: GroupDevicesTable;
  firmware: FirmwareTable;
  targets: TargetsTable;
  device_components: DeviceComponentsTable;
  update_attempts: UpdateAttemptsTable;
  users: UsersTable;
  api_tokens: ApiTokensTable;
  operator_sessions: OperatorSessionsTable;
}

type CreatedAt = ColumnType<Date, Date | string | undefined, never>;
type Timestamp = ColumnType<Date, Date | string, Date | string>;

export interface OrgsTable {
  id: Generated<string>;
  name: string;
  created_at: CreatedAt;
}

export interface ProductsTable {
  id: Generated<string>;
  org_id: string;
  name: string;
  requires_signature: Generated<boolean>;
  /** In-flight timeout of this product's update attempts (seconds); null: the server's default. */
  update_timeout_seconds: Generated<number | null>;
  created_at: CreatedAt;
}

export type DeviceProtocol = 'phoenix' | 'grisp' | 'wifidogx' | 'main-server' | 'keyauth';
export type DeviceApproval = 'approved' | 'pending' | 'revoked';
export type ConnectionStatus = 'online' | 'offline';

export interface DevicesTable {
  id: Generated<string>;
  org_id: string;
  product_id: string;
  identifier: string;
  protocol: ColumnType<DeviceProtocol, DeviceProtocol | undefined, DeviceProtocol>;
  approval: ColumnType<DeviceApproval, DeviceApproval | undefined, DeviceApproval>;
  description: string | null;
  tags: ColumnType<string[], string | undefined, string>;
  firmware_uuid: string | null;
  firmware_version: string | null;
  platform: string | null;
  architecture: string | null;
  connection_status: ColumnType<ConnectionStatus, ConnectionStatus | undefined, ConnectionStatus>;
  connected_node: string | null;
  last_seen_at: Timestamp | null;
  /** When the device was last revoked (kept when it is approved again): credentials issued before it are void. */
  revoked_at: Timestamp | null;
  created_at: CreatedAt;
  updated_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

export interface SignerCasTable {
  id: Generated<string>;
  org_id: string;
  product_id: string;
  fingerprint_sha256: string;
  subject: string;
  pem: string;
  not_after: Timestamp;
  description: string | null;
  created_at: CreatedAt;
}

export interface DeviceCertificatesTable {
  id: Generated<string>;
  device_id: string;
  fingerprint_sha256: string;
  serial: string;
  subject: string;
  issuer: string;
  not_before: Timestamp;
  not_after: Timestamp;
  pem: string | null;
  revoked_at: Timestamp | null;
  last_used_at: Timestamp | null;
  created_at: CreatedAt;
}

export type ActorType = 'operator' | 'api_token' | 'device' | 'system';

export interface AuditLogTable {
  id: Generated<number>;
  at: CreatedAt;
  org_id: string | null;
  actor_type: ActorType;
  actor_id: string | null;
  action: string;
  resource_type: string | null;
  resource_id: string | null;
  details: ColumnType<Record<string, unknown>, string | undefined, string>;
}

export interface GroupsTable {
  id: Generated<string>;
  org_id: string;
  product_id: string;
  name: string;
  description: string | null;
  priority: Generated<number>;
  created_at: CreatedAt;
}

export interface GroupDevicesTable {
  group_id: string;
  device_id: string;
  added_at: CreatedAt;
}

export interface FirmwareTable {
  id: Generated<string>;
  org_id: string;
  product_id: string;
  component: Generated<string>;
  version: string;
  platform: string | null;
  architecture: string | null;
  format: Generated<string>;
  sha256: string | null;
  size: number | null;
  signature: string | null;
  metadata: ColumnType<Record<string, unknown>, string | undefined, string>;
  has_blob: Generated<boolean>;
  uploaded_at: CreatedAt;
}

export interface TargetsTable {
  id: Generated<string>;
  org_id: string;
  group_id: string | null;
  device_id: string | null;
  component: Generated<string>;
  firmware_id: string;
  set_by: string | null;
  set_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

export interface DeviceComponentsTable {
  device_id: string;
  component: string;
  version: string | null;
  /** The catalogue record of the running version; null when the device runs firmware the catalogue does not hold. */
  firmware_id: string | null;
  /** The catalogue firmware the audit log last recorded this component running (`device.firmware_changed`). */
  audited_firmware_id: ColumnType<string | null, string | null | undefined, string | null>;
  updated_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

export type UpdateState =
  | 'queued'
  | 'sent'
  | 'begun'
  | 'downloading'
  | 'finished'
  | 'succeeded'
  | 'failed'
  | 'rolled_back'
  | 'timed_out'
  | 'cancelled';

export interface UpdateAttemptsTable {
  id: Generated<string>;
  org_id: string;
  device_id: string;
  firmware_id: string;
  component: Generated<string>;
  from_version: string | null;
  to_version: string;
  state: UpdateState;
  percent: number | null;
  bytes: number | null;
  total: number | null;
  errors: ColumnType<string[], string | undefined, string>;
  via: string | null;
  created_at: CreatedAt;
  sent_at: Timestamp | null;
  begun_at: Timestamp | null;
  finished_at: Timestamp | null;
  completed_at: Timestamp | null;
  updated_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

export type Role = 'admin' | 'operator' | 'viewer';

export interface UsersTable {
  id: Generated<string>;
  email: string;
  name: string | null;
  password_hash: string;
  role: Role;
  org_id: string | null;
  disabled_at: Timestamp | null;
  created_at: CreatedAt;
}

export interface ApiTokensTable {
  id: Generated<string>;
  user_id: string;
  name: string;
  token_hash: string;
  role: Role;
  org_id: string | null;
  expires_at: Timestamp | null;
  last_used_at: Timestamp | null;
  revoked_at: Timestamp | null;
  created_at: CreatedAt;
}

/** A login: the JWT it issued carries its id (`sid`) and is honoured while the row lives unrevoked. */
export interface OperatorSessionsTable {
  id: Generated<string>;
  user_id: string;
  created_at: CreatedAt;
  expires_at: Timestamp;
  revoked_at: Timestamp | null;
  revoked_reason: string | null;
  remote_address: string | null;
  user_agent: string | null;
}

export type Device = Selectable<DevicesTable>;
export type NewDevice = Insertable<DevicesTable>;
export type DeviceUpdate = Updateable<DevicesTable>;
export type Firmware = Selectable<FirmwareTable>;
export type Group = Selectable<GroupsTable>;
export type UpdateAttempt = Selectable<UpdateAttemptsTable>;
export type SignerCa = Selectable<SignerCasTable>;
export type DeviceCertificate = Selectable<DeviceCertificatesTable>;
