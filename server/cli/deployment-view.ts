/**
 * How the CLI draws a deployment (`deployments show|watch`, `status --deployment`): a headline,
 * a progress bar and per-device counts per stage and in total, or one line per change.
 */
import type { components } from '../../client/schema.ts';

type Deployment = components['schemas']['Deployment'];
type Stage = components['schemas']['DeploymentStage'];
type Threshold = components['schemas']['DeploymentThreshold'];
type Counts = components['schemas']['DeploymentCounts'];

export const stageName = (s: { index: number }, count: number) =>
  s.index === 0 && count > 1 ? 'canary' : `stage ${s.index + 1}`;

export function sizeText(s: Stage): string {
  const spec = s.size_spec as { count?: number; percent?: number; rest?: boolean } | undefined;
  const given = spec?.rest ? 'rest' : spec?.percent !== undefined ? `${spec.percent}%` : undefined;
  return given ? `${s.size} (${given})` : String(s.size);
}

export const thresholdText = (t: Threshold | null | undefined) =>
  !t ? '-' : 'percent' in t && t.percent !== undefined ? `${t.percent}%` : `${(t as { count: number }).count}`;

export function stageState(d: Pick<Deployment, 'state' | 'current_stage'>, s: Stage): string {
  if (s.succeeded_at) return 'succeeded';
  if (s.index === (d.current_stage ?? 0) && d.state === 'awaiting_approval') return 'awaiting approval';
  if (s.started_at) return d.state === 'paused' && s.index === (d.current_stage ?? 0) ? 'paused' : 'started';
  return 'waiting';
}

/** The cells of a progress bar, in order: what each glyph counts (the rest, `.`, is not told yet). */
const BAR_CELLS: readonly { glyph: string; label: string; count: (c: Counts) => number }[] = [
  { glyph: '#', label: 'succeeded', count: (c) => c.succeeded },
  { glyph: 'x', label: 'failed or cancelled', count: (c) => c.failed + c.cancelled },
  { glyph: '~', label: 'in flight', count: (c) => c.in_flight },
  { glyph: 'r', label: 'retrying', count: (c) => c.retrying },
  { glyph: 'p', label: 'penalty box', count: (c) => c.penalty_box },
];

/** What the glyphs of `progressBar` mean, one line. */
export const BAR_LEGEND = `${BAR_CELLS.map((b) => `${b.glyph} ${b.label}`).join('  ')}  . not told`;

/**
 * `[####xx~~rp....]`: succeeded, failed (and cancelled), in flight, retrying, penalty box, not told
 * yet. A state holding any device shows at least one cell, so one held device of thousands is seen.
 */
export function progressBar(c: Counts, width = 30): string {
  const total = Math.max(c.total, 1);
  const cells = BAR_CELLS.map((b) => {
    const n = b.count(c);
    return n > 0 ? Math.max(1, Math.round((n / total) * width)) : 0;
  });
  // Rounding up the small ones may overfill: take the excess from the widest.
  for (let over = cells.reduce((a, b) => a + b, 0) - width; over > 0; over--) {
    const widest = cells.indexOf(Math.max(...cells));
    cells[widest]!--;
  }
  const drawn = BAR_CELLS.map((b, i) => b.glyph.repeat(cells[i]!)).join('');
  return `[${drawn}${'.'.repeat(width - drawn.length)}]`;
}

export const countsText = (c: Counts) =>
  `${c.told}/${c.total} told, ${c.succeeded} succeeded, ${c.failed} failed, ${c.in_flight} in flight${c.retrying ? `, ${c.retrying} retrying` : ''}${c.penalty_box ? `, ${c.penalty_box} in the penalty box` : ''}${c.cancelled ? `, ${c.cancelled} cancelled` : ''}`;

export function rateText(d: Deployment): string | null {
  const r = d.rate;
  if (r?.type === 'exponential')
    return `exponential: ${r.base}/min, ×${r.factor} every ${r.every ?? r.base} ${r.criterion}${r.max ? `, at most ${r.max}/min` : ''}`;
  return d.rate_per_minute ? `${d.rate_per_minute}/min` : null;
}

export function headline(d: Deployment): string {
  const reason =
    d.state === 'paused' && d.paused_reason
      ? `: ${d.paused_reason}`
      : d.state === 'aborted' && d.aborted_reason
        ? `: ${d.aborted_reason}`
        : '';
  const stage = d.stages.length > 1 ? `, stage ${(d.current_stage ?? 0) + 1} of ${d.stages.length}` : '';
  return `deployment ${d.name ?? d.id} (${d.version}) ${d.state.replace('_', ' ')}${stage}${reason}`;
}

/** The in-place drawing: a headline, then one progress bar per stage. */
export function drawDeployment(d: Deployment): string {
  const names = d.stages.map((s) => stageName(s, d.stages.length));
  const width = Math.max(...names.map((n) => n.length));
  const lines = [headline(d)];
  for (const [i, s] of d.stages.entries())
    lines.push(`  ${names[i]!.padEnd(width)}  ${progressBar(s)}  ${countsText(s)}  ${stageState(d, s)}`);
  lines.push(`  ${'total'.padEnd(width)}  ${progressBar(d.counts)}  ${countsText(d.counts)}`);
  lines.push(`  ${BAR_LEGEND}`);
  return `${lines.join('\n')}\n`;
}

/** One line per change, for logs and CI: per stage succeeded of its size, failed, in flight, retrying, penalty box. */
export function deploymentLine(d: Deployment): string {
  const stages = d.stages
    .map(
      (s) =>
        `${stageName(s, d.stages.length)} ${s.succeeded}/${s.size} ok ${s.failed} failed ${s.in_flight} in flight ${s.retrying} retrying ${s.penalty_box} penalty box`,
    )
    .join('; ');
  return `${headline(d)}; ${stages}`;
}
