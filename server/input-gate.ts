/**
 * The input gate: no string from a client carries what the database cannot store. PostgreSQL
 * refuses U+0000 in text and jsonb, and a lone UTF-16 surrogate (JSON `"\ud800"`) is either
 * refused by jsonb or silently turned into U+FFFD on the way to text. Every entry point (the
 * HTTP listeners' hook below, the Phoenix engine, the edges' JSON) calls `findBadString` on
 * what it parsed and refuses the input, naming the field, before anything reaches SQL.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';

declare global {
  interface String {
    /** ES2024: false when the string holds a lone surrogate (Node ≥ 20). */
    isWellFormed(): boolean;
  }
}

/** Where a refused string is (`body.gateway[0].gw_id`) and what is wrong with it. */
export interface BadString {
  path: string;
  problem: 'nul' | 'lone_surrogate';
  /** True when the bad string is an object key rather than a value. */
  key: boolean;
}

/** What is wrong with one string, if anything. */
export function stringProblem(s: string): BadString['problem'] | undefined {
  if (s.includes('\u0000')) return 'nul';
  if (!s.isWellFormed()) return 'lone_surrogate';
  return undefined;
}

interface Frame {
  value: object;
  parent: Frame | undefined;
  key: string | number | undefined;
}

/**
 * The first string (value or object key) inside a parsed JSON value that holds NUL or a lone
 * surrogate, with its path from `root` (may be ''); undefined when every string is clean. Only plain objects
 * and arrays are walked (a stream, Buffer or binary payload is not text). Iterative: a 1 MiB body
 * can nest deeper than the call stack.
 */
export function findBadString(value: unknown, root: string): BadString | undefined {
  if (typeof value === 'string') {
    const problem = stringProblem(value);
    return problem ? { path: root, problem, key: false } : undefined;
  }
  if (!isContainer(value)) return undefined;
  const stack: Frame[] = [{ value, parent: undefined, key: undefined }];
  while (stack.length > 0) {
    const frame = stack.pop()!;
    const v = frame.value;
    if (Array.isArray(v)) {
      for (let i = 0; i < v.length; i++) {
        const item: unknown = v[i];
        if (typeof item === 'string') {
          const problem = stringProblem(item);
          if (problem) return { path: pathOf(root, frame, i), problem, key: false };
        } else if (isContainer(item)) stack.push({ value: item, parent: frame, key: i });
      }
      continue;
    }
    for (const key of Object.keys(v)) {
      const keyProblem = stringProblem(key);
      if (keyProblem) return { path: pathOf(root, frame, key), problem: keyProblem, key: true };
      const item: unknown = (v as Record<string, unknown>)[key];
      if (typeof item === 'string') {
        const problem = stringProblem(item);
        if (problem) return { path: pathOf(root, frame, key), problem, key: false };
      } else if (isContainer(item)) stack.push({ value: item, parent: frame, key });
    }
  }
  return undefined;
}

/** A sentence for the client: which field, what is wrong, what to send instead. */
export function describeBadString(bad: BadString): string {
  const what = bad.key ? `the key ${bad.path}` : bad.path;
  return bad.problem === 'nul'
    ? `${what} contains a NUL character (U+0000), which is never accepted; remove it`
    : `${what} contains a lone UTF-16 surrogate (U+D800–U+DFFF without its pair), which is not valid Unicode; send well-formed text`;
}

/** A request refused by the gate: 400 in every HTTP error shape (it carries `statusCode`). */
export class InvalidStringError extends Error {
  override readonly name = 'InvalidStringError';
  readonly statusCode = 400;
  readonly code = 'invalid';
  readonly details: { field: string; problem: BadString['problem'] };
  constructor(readonly bad: BadString) {
    super(describeBadString(bad));
    this.details = { field: bad.path, problem: bad.problem };
  }
}

/** The first bad string of a request's path parameters, query string and parsed body. */
export function findBadRequestString(
  request: Pick<FastifyRequest, 'params' | 'query' | 'body'>,
): BadString | undefined {
  return (
    findBadString(request.params, 'params') ??
    findBadString(request.query, 'query') ??
    findBadString(request.body, 'body')
  );
}

const GATE_REGISTERED = 'fleethubInputGate';

/**
 * Puts the gate in front of every route of an HTTP listener (call on the root instance before
 * routes are added): a `preValidation` hook, so it runs after authentication (`onRequest`) and
 * body parsing, and before schema validation and the handler.
 */
export function registerInputGate(app: FastifyInstance): void {
  if (app.hasDecorator(GATE_REGISTERED)) return;
  app.decorate(GATE_REGISTERED, true);
  app.addHook('preValidation', (request, _reply, done) => {
    const bad = findBadRequestString(request);
    if (bad) {
      request.log.info({ field: bad.path, problem: bad.problem }, 'request refused: invalid string');
      return done(new InvalidStringError(bad));
    }
    done();
  });
}

function isContainer(value: unknown): value is object {
  if (typeof value !== 'object' || value === null) return false;
  if (Array.isArray(value)) return true;
  // Plain objects, including null-prototype ones (Fastify's params) and objects made from those.
  const proto: object | null = Object.getPrototypeOf(value);
  return proto === null || Object.getPrototypeOf(proto) === null;
}

const IDENTIFIER = /^[A-Za-z_$][\w$]*$/;

function pathOf(root: string, frame: Frame, last: string | number): string {
  const keys: Array<string | number> = [last];
  for (let f: Frame | undefined = frame; f && f.key !== undefined; f = f.parent) keys.push(f.key);
  let path = root;
  // JSON.stringify escapes NUL and lone surrogates, so the path is safe to log and to send.
  for (let i = keys.length - 1; i >= 0; i--) {
    const k = keys[i]!;
    path += typeof k === 'number' ? `[${k}]` : IDENTIFIER.test(k) ? `.${k}` : `[${JSON.stringify(k)}]`;
  }
  // Root '': paths read as the message's own fields (`gateway[0].gw_id`).
  return root === '' && path.startsWith('.') ? path.slice(1) : path;
}
