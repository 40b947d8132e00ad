import semver from 'semver';

export type FleetErrorCode = 'not_found' | 'conflict' | 'invalid' | 'forbidden';

/** A domain error with a code the adapters map to a status (REST) or an error reply (channels). */
export class FleetError extends Error {
  readonly code: FleetErrorCode;
  readonly details?: Record<string, unknown>;

  constructor(code: FleetErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'FleetError';
    this.code = code;
    if (details) this.details = details;
  }
}

/** Names appear in topics (`group:<org>:<product>:<group>`): no colons, no spaces. */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export function isUuid(value: unknown): value is string {
  return typeof value === 'string' && UUID_PATTERN.test(value);
}

/** Returns `name` when it is a valid org/product/group name, throws `invalid` otherwise. */
export function validName(kind: string, name: unknown): string {
  if (typeof name !== 'string' || !NAME_PATTERN.test(name)) {
    throw new FleetError(
      'invalid',
      `${kind} name must be 1-63 characters of letters, digits, '_', '.', '-' and start with a letter or digit`,
      {
        field: 'name',
        value: typeof name === 'string' ? name : null,
      },
    );
  }
  return name;
}

/** Returns `version` when it is a semantic version (e.g. 1.4.0, 2.0.0-rc.1), throws `invalid` otherwise. */
export function validVersion(version: unknown): string {
  if (typeof version !== 'string' || semver.valid(version) === null) {
    throw new FleetError('invalid', 'version must be a semantic version such as 1.2.3', {
      field: 'version',
      value: typeof version === 'string' ? version : null,
    });
  }
  return version;
}

export function validUuid(field: string, value: unknown): string {
  if (!isUuid(value))
    throw new FleetError('invalid', `${field} must be a UUID`, {
      field,
      value: typeof value === 'string' ? value : null,
    });
  return value.toLowerCase();
}

export function notFound(kind: string, ref: string): FleetError {
  return new FleetError('not_found', `${kind} ${JSON.stringify(ref)} does not exist (or is not in this organization)`, {
    resource: kind,
    ref,
  });
}

/** True for PostgreSQL unique violations (SQLSTATE 23505) on both `pg` and PGlite. */
export function isUniqueViolation(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === '23505';
}

/** True for foreign key violations (SQLSTATE 23503). */
export function isForeignKeyViolation(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === '23503';
}
