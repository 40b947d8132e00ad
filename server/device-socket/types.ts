/** The device socket's types, shared by its definition (index.ts) and its channels. */
import type { IncomingMessage } from 'node:http';
import type { SocketDefinition } from '../channels/types.ts';
import type { DeviceProtocol } from '../db/schema.ts';

/** What a device socket carries: who the certificate says the device is (plain data). */
export interface DeviceAssigns {
  deviceId: string;
  orgId: string;
  productId: string;
  identifier: string;
  /** The certificate that authenticated this connection: its revocation ends it, and joins check it. */
  certificateId: string;
}

/** Counters of the device socket (the engine counts protocol-level events itself). */
export interface DeviceSocketStats {
  /** Events a device sent that no channel understands (answered `unknown event`). */
  unknownEvents: number;
  /** Update reports refused (bad payload, no update in flight, transition not allowed). */
  rejectedReports: number;
}

export interface DeviceSocketOptions {
  /** The identity the device listener attached to the request (`deviceIdentityOf` from listeners/device.ts). */
  identityOf(
    request: IncomingMessage,
  ): (DeviceAssigns & { protocol?: DeviceProtocol; connectedNode?: string | null }) | undefined;
  /** Closes this node's sockets with this id (`endpoint.closeSockets`, no message); wired after the endpoint exists. */
  closeLocal(socketId: string, reason: string): void;
}

export type DeviceSocket = SocketDefinition<DeviceAssigns> & { readonly stats: DeviceSocketStats };
