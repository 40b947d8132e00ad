import type { Reply } from '../channels/types.ts';
import { FleetError } from '../fleet/index.ts';

/** A domain error as the channel's error reply `{reason, details}`; anything else is rethrown (the channel crashes). */
export function deviceErrorReply(err: unknown): Reply {
  if (err instanceof FleetError) {
    return { status: 'error', response: { reason: err.message, details: { code: err.code, ...(err.details ?? {}) } } };
  }
  throw err;
}

export const UNKNOWN_EVENT: Reply = { status: 'error', response: { reason: 'unknown event' } };
