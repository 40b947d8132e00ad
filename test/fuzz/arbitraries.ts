/**
 * Hostile input for the device-facing protocols: strings with NUL bytes and lone surrogates,
 * oversized values, wrong types, deep nesting. Shared by test/fuzz/protocols.test.ts and the
 * bench's long fuzz mode.
 */
import fc from 'fast-check';

/** `FUZZ_RUNS` raises the runs per protocol; `FUZZ_SEED` replays another seed. Fixed by default. */
export function fuzzParameters(defaultRuns: number): {
  seed: number;
  numRuns: number;
  endOnFailure: boolean;
  includeErrorInReport: boolean;
} {
  return {
    seed: Number(process.env.FUZZ_SEED ?? 20261201),
    numRuns: Number(process.env.FUZZ_RUNS ?? defaultRuns),
    // Shrinking replays against a live server; a run names its seed and path to replay it instead.
    endOnFailure: !process.env.FUZZ_SHRINK,
    includeErrorInReport: true,
  };
}

/** Strings a parser or a database column chokes on, plus plain ones. */
export const nastyString: fc.Arbitrary<string> = fc.oneof(
  { weight: 3, arbitrary: fc.string({ maxLength: 24 }) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 24 }) },
  {
    weight: 3,
    arbitrary: fc.constantFrom(
      '\u0000',
      'a\u0000b',
      '\ud800',
      'x\udfffy',
      '\ud83d',
      '\uffff\ufffe',
      '../../../etc/passwd',
      '%00%2e%2e',
      "'; DROP TABLE devices; --",
      '{"__proto__":{"polluted":1}}',
      '1.0.0\u0000',
      'GRiSP2 device \u0000',
      '',
      ' ',
    ),
  },
  { weight: 1, arbitrary: fc.integer({ min: 1_000, max: 80_000 }).map((n) => 'x'.repeat(n)) },
  {
    weight: 1,
    arbitrary: fc
      .tuple(fc.string({ maxLength: 8 }), fc.constantFrom('\u0000', '\ud800', '\udc00'))
      .map(([s, bad]) => `${s}${bad}${s}`),
  },
);

/** Numbers of every awkward kind (JSON turns NaN and infinities into null). */
export const nastyNumber: fc.Arbitrary<number> = fc.oneof(
  fc.integer(),
  fc.double(),
  fc.constantFrom(0, -1, -0, 2 ** 31, 2 ** 53 + 1, -(2 ** 63), 1e308, 5e-324, 0.5),
);

/** Any JSON value, a few levels deep, with nasty strings as keys and values. */
export const jsonValue: fc.Arbitrary<unknown> = fc.letrec<{ value: unknown }>((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    nastyString,
    nastyNumber,
    fc.boolean(),
    fc.constant(null),
    fc.array(tie('value'), { maxLength: 5 }),
    fc.dictionary(nastyString, tie('value'), { maxKeys: 5 }),
  ),
})).value;

/** `[[[[…]]]]` or `{"a":{"a":…}}` nested this deep, as JSON text (too deep to build as a value safely). */
export const deepJsonText: fc.Arbitrary<string> = fc
  .tuple(fc.integer({ min: 50, max: 20_000 }), fc.boolean())
  .map(([depth, arrays]) =>
    arrays ? '['.repeat(depth) + ']'.repeat(depth) : `${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}`,
  );

/** A value for a field the protocol knows: sometimes well typed (`good`), often anything at all. */
export function field<T>(good: fc.Arbitrary<T>): fc.Arbitrary<unknown> {
  return fc.oneof({ weight: 2, arbitrary: good }, { weight: 3, arbitrary: jsonValue });
}

/** An object with some of the protocol's fields (each fuzzed) and some extra keys. */
export function messageOf(fields: Record<string, fc.Arbitrary<unknown>>): fc.Arbitrary<Record<string, unknown>> {
  return fc
    .tuple(fc.record(fields, { requiredKeys: [] }), fc.dictionary(nastyString, jsonValue, { maxKeys: 2 }))
    .map(([known, extra]) => ({ ...extra, ...known }));
}

/** Text of one message: mostly JSON of `message`, sometimes any JSON, deep JSON, or not JSON at all. */
export function frameText(message: fc.Arbitrary<unknown>): fc.Arbitrary<string> {
  return fc.oneof(
    { weight: 6, arbitrary: message.map((m) => JSON.stringify(m)) },
    { weight: 2, arbitrary: jsonValue.map((v) => JSON.stringify(v)) },
    { weight: 1, arbitrary: deepJsonText },
    { weight: 1, arbitrary: nastyString },
  );
}
