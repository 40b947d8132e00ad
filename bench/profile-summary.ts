/**
 * `tsx bench/profile-summary.ts <file.cpuprofile> [top] [--under=<function>]`: self time per
 * function (and per file or package), optionally only below one function (`--under=#deliver`:
 * the broadcast loop), the evidence docs/performance.md quotes for each bound.
 */
import { readFileSync } from 'node:fs';

interface Node {
  id: number;
  children?: number[];
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

const args = process.argv.slice(2);
const under = args.find((a) => a.startsWith('--under='))?.slice(8);
const [file, topArg] = args.filter((a) => !a.startsWith('--'));
if (!file) {
  console.error('usage: tsx bench/profile-summary.ts <file.cpuprofile> [top]');
  process.exit(2);
}
const profile = JSON.parse(readFileSync(file, 'utf8')) as { nodes: Node[]; samples: number[]; timeDeltas: number[] };
const top = Number(topArg ?? 25);
// --under=<function>: only samples whose stack contains that function (e.g. the broadcast loop).
const keep = new Set<number>();
if (under) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const mark = (id: number) => {
    keep.add(id);
    for (const child of byId.get(id)?.children ?? []) mark(child);
  };
  for (const n of profile.nodes) if (n.callFrame.functionName === under && !keep.has(n.id)) mark(n.id);
}
const selfByNode = new Map<number, number>();
profile.samples.forEach((id, i) => {
  if (under && !keep.has(id)) return;
  selfByNode.set(id, (selfByNode.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0));
});
const total = [...selfByNode.values()].reduce((a, b) => a + b, 0);
const byFunction = new Map<string, number>();
const byFile = new Map<string, number>();
for (const node of profile.nodes) {
  const self = selfByNode.get(node.id) ?? 0;
  const url = node.callFrame.url.replace(/^file:\/\/.*?\/(node_modules|server|bench)\//, '$1/');
  const name = `${node.callFrame.functionName || '(anonymous)'} ${url}:${node.callFrame.lineNumber + 1}`;
  byFunction.set(name, (byFunction.get(name) ?? 0) + self);
  const key = url.startsWith('node_modules/')
    ? url
        .split('/')
        .slice(0, url.startsWith('node_modules/@') ? 3 : 2)
        .join('/')
    : url || node.callFrame.functionName;
  byFile.set(key, (byFile.get(key) ?? 0) + self);
}
const show = (title: string, map: Map<string, number>) => {
  console.log(`\n${title} (total ${(total / 1000).toFixed(0)} ms)`);
  for (const [name, us] of [...map].sort((a, b) => b[1] - a[1]).slice(0, top))
    console.log(`${((100 * us) / total).toFixed(1).padStart(5)}%  ${name}`);
};
show('self time by function', byFunction);
show('self time by file / package', byFile);
