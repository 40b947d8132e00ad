/**
 * Login throttling: failed logins are counted per account (the email as typed, lowercased) and
 * per client address, with rate-limiter-flexible's in-memory counters. Past the limit, further
 * attempts for that account or from that address are refused with 429 and Retry-After before
 * any password is checked, until the window ends. A successful login clears its account's count
 * (not its address's). Counters are per node: a cluster of N nodes admits up to N times the limit.
 */
import { RateLimiterMemory, type RateLimiterRes } from 'rate-limiter-flexible';

export interface LoginThrottleOptions {
  /** Failed logins per account within the window before the account is throttled (default 10). */
  accountFailures?: number;
  /** Failed logins per client address within the window before the address is throttled (default 50). */
  addressFailures?: number;
  /** The window, and how long a throttled key stays throttled, in seconds (default 900). */
  windowSeconds?: number;
}

export interface Throttled {
  /** Which counter is over its limit. */
  scope: 'account' | 'address';
  retryAfterSeconds: number;
  /** True for the first refused attempt of this block (it is audited; later ones are only logged). */
  first: boolean;
}

export class LoginThrottle {
  readonly #account: RateLimiterMemory;
  readonly #address: RateLimiterMemory;
  readonly #limits: { account: number; address: number };
  /** Keys whose block was already audited, until the block ends. */
  readonly #reported = new Map<string, number>();

  constructor(options: LoginThrottleOptions = {}) {
    const duration = options.windowSeconds ?? 900;
    this.#limits = { account: options.accountFailures ?? 10, address: options.addressFailures ?? 50 };
    this.#account = new RateLimiterMemory({ keyPrefix: 'login_account', points: this.#limits.account, duration });
    this.#address = new RateLimiterMemory({ keyPrefix: 'login_address', points: this.#limits.address, duration });
  }

  /** Whether an attempt may go ahead; checks without counting. */
  async check(email: string, address: string): Promise<Throttled | undefined> {
    const [byAccount, byAddress] = await Promise.all([
      this.#account.get(accountKey(email)),
      this.#address.get(address),
    ]);
    const over = (res: RateLimiterRes | null, limit: number) => res !== null && res.consumedPoints >= limit;
    const scope = over(byAccount, this.#limits.account)
      ? 'account'
      : over(byAddress, this.#limits.address)
        ? 'address'
        : undefined;
    if (!scope) return undefined;
    const res = (scope === 'account' ? byAccount : byAddress)!;
    const key = scope === 'account' ? `a:${accountKey(email)}` : `i:${address}`;
    const now = Date.now();
    for (const [k, until] of this.#reported) if (until <= now) this.#reported.delete(k);
    const first = !this.#reported.has(key);
    if (first) this.#reported.set(key, now + res.msBeforeNext);
    return { scope, retryAfterSeconds: Math.max(1, Math.ceil(res.msBeforeNext / 1000)), first };
  }

  /** Counts a failed attempt against both the account and the address. */
  async failed(email: string, address: string): Promise<void> {
    await Promise.all([this.#account.penalty(accountKey(email)), this.#address.penalty(address)]);
  }

  /** A successful login: its account starts again from zero. */
  async succeeded(email: string): Promise<void> {
    await this.#account.delete(accountKey(email));
  }
}

function accountKey(email: string): string {
  return email.trim().toLowerCase();
}
