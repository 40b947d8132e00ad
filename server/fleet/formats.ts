/**
 * Which package formats each protocol installs: the protocols' declaration, kept here as data so
 * the fleet domain picks, per device, the variant of a release its protocol can take without
 * importing the edges. A release is every firmware record of one product, component and version;
 * each record (variant) holds one package format. Order is preference: the first format a release
 * has wins; `*` is any bytes (the image is handed to the device as it is).
 */
import { sql, type RawBuilder } from 'kysely';
import type { DeviceProtocol } from '../db/schema.ts';

export const ANY_FORMAT = '*';

export interface ProtocolInstalls {
  /** Formats in order of preference (`*`: any format). */
  formats: readonly string[];
  /**
   * The protocol's devices run the base component `firmware` by nature (it need not be reported).
   * Main Server devices run only the extensions they report, `firmware` among them or not.
   */
  baseFirmware: boolean;
}

export const PROTOCOL_INSTALLS: Readonly<Record<DeviceProtocol, ProtocolInstalls>> = {
  // The device client streams any image to its inactive slot.
  phoenix: { formats: ['raw', ANY_FORMAT], baseFirmware: true },
  // A board fetches a package: a tar with MANIFEST.sealed (server/edges/grisp/package.ts).
  grisp: { formats: ['grisp'], baseFirmware: true },
  // The image goes to sysupgrade as it is.
  wifidogx: { formats: ['raw', ANY_FORMAT], baseFirmware: true },
  // A Pi unpacks a ZIP with device_update.json (shared/main-server-package.ts).
  'main-server': { formats: ['main-server-zip'], baseFirmware: false },
  // The client downloads the offered bytes and checks their sha256.
  keyauth: { formats: ['raw', ANY_FORMAT], baseFirmware: true },
};

/** Whether a device of `protocol` installs a package of `format`. */
export function installs(protocol: DeviceProtocol, format: string): boolean {
  const { formats } = PROTOCOL_INSTALLS[protocol];
  return formats.includes(format) || formats.includes(ANY_FORMAT);
}

/** The declaration as a relation `(protocol, format, rank)` for set-based statements. */
export function installsSql(): RawBuilder<unknown> {
  const rows = Object.entries(PROTOCOL_INSTALLS).flatMap(([protocol, { formats }]) =>
    formats.map((format, rank) => sql`(${sql.lit(protocol)}, ${sql.lit(format)}, ${sql.lit(rank)})`),
  );
  return sql`(VALUES ${sql.join(rows)})`;
}

/** The protocols whose devices run `firmware` without reporting it, as a SQL list. */
export function baseFirmwareProtocolsSql(): RawBuilder<unknown> {
  return sql.join(
    Object.entries(PROTOCOL_INSTALLS)
      .filter(([, p]) => p.baseFirmware)
      .map(([protocol]) => sql.lit(protocol)),
  );
}
