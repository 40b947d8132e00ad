/**
 * `tsx bench/heap-summary.ts <before.heapsnapshot> <after.heapsnapshot> <devices>`: retained
 * self size per constructor that appeared between two snapshots, per device — which objects a
 * joined device costs the server.
 */
import { readFileSync } from 'node:fs';

interface Snapshot {
  snapshot: { meta: { node_fields: string[]; node_types: [string[]] } };
  nodes: number[];
  strings: string[];
}

function bySize(file: string): Map<string, { count: number; bytes: number }> {
  const snap = JSON.parse(readFileSync(file, 'utf8')) as Snapshot;
  const fields = snap.snapshot.meta.node_fields;
  const types = snap.snapshot.meta.node_types[0];
  const width = fields.length;
  const typeAt = fields.indexOf('type');
  const nameAt = fields.indexOf('name');
  const sizeAt = fields.indexOf('self_size');
  const out = new Map<string, { count: number; bytes: number }>();
  for (let i = 0; i < snap.nodes.length; i += width) {
    const type = types[snap.nodes[i + typeAt]!]!;
    let name =
      type === 'object' || type === 'closure' || type === 'native'
        ? snap.strings[snap.nodes[i + nameAt]!]!
        : `(${type})`;
    if (type === 'closure') name = `closure ${name}`;
    const entry = out.get(name) ?? { count: 0, bytes: 0 };
    entry.count++;
    entry.bytes += snap.nodes[i + sizeAt]!;
    out.set(name, entry);
  }
  return out;
}

const [beforeFile, afterFile, devicesArg] = process.argv.slice(2);
if (!beforeFile || !afterFile || !devicesArg) {
  console.error('usage: tsx bench/heap-summary.ts <before.heapsnapshot> <after.heapsnapshot> <devices>');
  process.exit(2);
}
const devices = Number(devicesArg);
const before = bySize(beforeFile);
const after = bySize(afterFile);
const rows = [...after].map(([name, a]) => {
  const b = before.get(name) ?? { count: 0, bytes: 0 };
  return { name, perDevice: (a.count - b.count) / devices, bytesPerDevice: (a.bytes - b.bytes) / devices };
});
const total = rows.reduce((s, r) => s + r.bytesPerDevice, 0);
console.log(`heap growth per device: ${(total / 1024).toFixed(2)} KiB`);
for (const r of rows.sort((x, y) => y.bytesPerDevice - x.bytesPerDevice).slice(0, 40)) {
  console.log(
    `${r.bytesPerDevice.toFixed(0).padStart(7)} B  ${r.perDevice.toFixed(2).padStart(6)} ×  ${r.name.slice(0, 100)}`,
  );
}
