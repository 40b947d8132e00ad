/**
 * The two OpenAPI linters the document must pass, run in-process and offline: Redocly's
 * `recommended` ruleset (@redocly/openapi-core, the engine of `redocly lint`) and Spectral's
 * `spectral:oas` ruleset (@stoplight/spectral-core, the engine of `spectral lint`).
 */
import { createConfig, lintFromString } from '@redocly/openapi-core';
import spectralCore from '@stoplight/spectral-core';
import spectralParsers from '@stoplight/spectral-parsers';
import { oas } from '@stoplight/spectral-rulesets';

export interface LintProblem {
  linter: 'redocly' | 'spectral';
  severity: 'error' | 'warn' | 'info' | 'hint';
  rule: string;
  message: string;
  where: string;
}

/** Redocly lint with the `recommended` rules (the CLI's default), plus `rules` overrides. */
export async function redoclyLint(document: object, rules: Record<string, string> = {}): Promise<LintProblem[]> {
  const config = await createConfig({ extends: ['recommended'], rules } as never);
  const problems = await lintFromString({
    source: JSON.stringify(document),
    absoluteRef: 'openapi.json',
    config,
  });
  return problems.map((p) => ({
    linter: 'redocly',
    severity: p.severity === 'error' ? 'error' : 'warn',
    rule: p.ruleId,
    message: p.message,
    where: p.location[0]?.pointer ?? '',
  }));
}

const SEVERITIES = ['error', 'warn', 'info', 'hint'] as const;

/** Spectral lint with `spectral:oas` (the CLI's `extends: spectral:oas`). */
export async function spectralLint(document: object): Promise<LintProblem[]> {
  const spectral = new spectralCore.Spectral();
  spectral.setRuleset({ extends: [[oas as never, 'recommended']] } as never);
  const results = await spectral.run(
    new spectralCore.Document(JSON.stringify(document, null, 2), spectralParsers.Json, 'openapi.json'),
  );
  return results.map((r) => ({
    linter: 'spectral',
    severity: SEVERITIES[r.severity] ?? 'hint',
    rule: String(r.code),
    message: r.message,
    where: `#/${r.path.join('/')}`,
  }));
}
