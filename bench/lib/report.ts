/**
 * What a bench run reports: the raw figures per phase (`Results`), the summary with the keys
 * the README quotes (`connections.per_conn_kib`, `fanout.<N>.p99_ms`, ...), and the markdown table.
 */

export type Figure = number | string | undefined;
export type Bag = Record<string, Figure | number[]>;

export interface Results {
  meta: Record<string, Figure | number[]>;
  /** Per device count: fleethub and floor memory. */
  connections: Record<number, Bag>;
  handshake: Bag;
  /** Per group size: fleethub, floor and Mosquitto latencies. */
  fanout: Record<number, Bag>;
  firmware: Bag;
  /** Per database. */
  ingest: Record<string, Bag>;
  /** One deployment over every device (stage figures as `stage<N>_<figure>`). */
  deployment: Bag;
}

export interface Summary {
  meta: Results['meta'];
  connections: Bag;
  handshake: Bag;
  fanout: Record<string, Bag>;
  firmware: Bag;
  ingest: Bag;
  deployment: Bag;
}

/** The figures under the documented keys; `connections.*` are at the largest count reached. */
export function summarize(results: Results, max: number): Summary {
  const at = results.connections[max] ?? {};
  const connections: Bag = {
    devices: at.devices,
    per_conn_kib: at.per_conn_kib,
    floor_per_conn_kib: at.floor_per_conn_kib,
    heap_per_conn_kib: at.heap_per_conn_kib,
    floor_heap_per_conn_kib: at.floor_heap_per_conn_kib,
    external_per_conn_kib: at.external_per_conn_kib,
    floor_external_per_conn_kib: at.floor_external_per_conn_kib,
    heap_total_per_conn_kib: at.heap_total_per_conn_kib,
    floor_heap_total_per_conn_kib: at.floor_heap_total_per_conn_kib,
    malloc_per_conn_kib: at.malloc_per_conn_kib,
    floor_malloc_per_conn_kib: at.floor_malloc_per_conn_kib,
    reservations_per_conn_kib: at.reservations_per_conn_kib,
    floor_reservations_per_conn_kib: at.floor_reservations_per_conn_kib,
    rss_mib: at.rss_mib,
    floor_rss_mib: at.floor_rss_mib,
  };
  for (const [n, bag] of Object.entries(results.connections)) {
    connections[`at_${n}_per_conn_kib`] = bag.per_conn_kib as Figure;
    connections[`at_${n}_floor_per_conn_kib`] = bag.floor_per_conn_kib as Figure;
  }
  const pglite = results.ingest.pglite ?? {};
  const postgres = results.ingest.postgres ?? {};
  return {
    meta: results.meta,
    connections,
    handshake: results.handshake,
    fanout: Object.fromEntries(Object.entries(results.fanout).map(([n, bag]) => [String(n), bag])),
    firmware: results.firmware,
    deployment: results.deployment,
    ingest: {
      events_s: pglite.events_s as Figure,
      p99_ack_ms: pglite.p99_ack_ms as Figure,
      offered_per_s: pglite.offered_per_s as Figure,
      postgres_events_s: postgres.events_s as Figure,
      postgres_p99_ack_ms: postgres.p99_ack_ms as Figure,
      postgres_offered_per_s: postgres.offered_per_s as Figure,
      pglite,
      postgres,
    } as unknown as Bag,
  };
}

function num(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

function fmt(v: unknown): string {
  const n = num(v);
  if (n === undefined) return '—';
  return Math.abs(n) >= 100 ? String(Math.round(n)) : String(Math.round(n * 100) / 100);
}

/** `fleethub / baseline`; `higherIsBetter` only changes the reading, not the division. */
function ratio(a: unknown, b: unknown): string {
  const x = num(a);
  const y = num(b);
  if (x === undefined || y === undefined || y === 0) return '—';
  return `${(x / y).toFixed(2)}×`;
}

/** The markdown table: each fleethub figure, its baseline and the ratio, with the target. */
export function printTable(s: Summary): string {
  const rows: string[][] = [];
  const row = (what: string, fleethub: unknown, baselineName: string, baseline: unknown, target: string) =>
    rows.push([what, fmt(fleethub), baselineName, fmt(baseline), ratio(fleethub, baseline), target]);
  const c = s.connections;
  row(
    `RSS per joined device, KiB (${fmt(c.devices)} devices)`,
    c.per_conn_kib,
    'raw ws+TLS',
    c.floor_per_conn_kib,
    '≤ 1.3×',
  );
  row('heap per joined device, KiB', c.heap_per_conn_kib, 'raw ws+TLS', c.floor_heap_per_conn_kib, '');
  for (const key of Object.keys(c).filter((k) => /^at_\d+_per_conn_kib$/.test(k))) {
    const n = key.split('_')[1];
    if (String(c.devices) === n) continue;
    row(`RSS per joined device, KiB (at ${n})`, c[key], 'raw ws+TLS', c[`at_${n}_floor_per_conn_kib`], '≤ 1.3×');
  }
  const h = s.handshake;
  row('full mTLS handshake + join, /s', h.full_per_s, 'Mosquitto mTLS connect+subscribe', h.mosquitto_per_s, '≥ 1×');
  row('resumed handshake + join, /s', h.resumed_per_s, 'full handshake + join', h.full_per_s, '≥ 1.5×');
  // What bounds the storms: both sides share the machine's cores.
  row('server CPU per full connect, ms', h.full_server_cpu_ms, 'Mosquitto', h.mosquitto_server_cpu_ms, '');
  row('load generator CPU per full connect, ms', h.full_client_cpu_ms, 'MQTT clients', h.mosquitto_client_cpu_ms, '');
  row('server CPU per resumed connect, ms', h.resumed_server_cpu_ms, 'full connect', h.full_server_cpu_ms, '');
  for (const [n, f] of Object.entries(s.fanout)) {
    row(`fanout ${n}: p50 ms`, f.p50_ms, 'raw ws broadcast', f.floor_p50_ms, '');
    row(`fanout ${n}: p99 ms`, f.p99_ms, 'raw ws broadcast', f.floor_p99_ms, n === '10000' ? '≤ 1.25×' : '');
    row(`fanout ${n}: p99 ms`, f.p99_ms, 'Mosquitto QoS 0', f.mosquitto_p99_ms, n === '10000' ? '< 1×' : '');
    row(`fanout ${n}: max ms`, f.max_ms, 'raw ws broadcast', f.floor_max_ms, '');
  }
  const fw = s.firmware;
  row('firmware 50 × 64 MiB, MiB/s', fw.mib_s, 'plain https', fw.floor_mib_s, '≥ 0.9×');
  row(
    'firmware: server RSS growth while serving, MiB',
    fw.rss_growth_mib,
    'plain https',
    fw.floor_rss_growth_mib,
    'bounded',
  );
  const i = s.ingest;
  row(`report ingest PGlite, events/s (offered ${fmt(i.offered_per_s)}/s)`, i.events_s, 'offered', i.offered_per_s, '');
  row('report ingest PGlite, p99 ack ms', i.p99_ack_ms, '', undefined, '');
  row(
    `report ingest PostgreSQL, events/s (offered ${fmt(i.postgres_offered_per_s)}/s)`,
    i.postgres_events_s,
    'offered',
    i.postgres_offered_per_s,
    '',
  );
  row('report ingest PostgreSQL, p99 ack ms', i.postgres_p99_ack_ms, '', undefined, '');
  const d = s.deployment;
  const fan = s.fanout['1000'] ?? {};
  for (const n of [1, 2, 3]) {
    const size = fmt(d[`stage${n}_devices`]);
    const start = n === 1 ? 'create' : 'approve';
    // Baseline: the same fleet's plain group retarget of 1,000 devices (API request → p99 received).
    row(
      `deployment of ${fmt(d.devices)}: stage ${n} (${size} devices), ${start} → all told, ms`,
      d[`stage${n}_told_ms`],
      n === 2 ? 'group retarget of 1000, p99 received' : '',
      n === 2 ? fan.from_api_request_p99_ms : undefined,
      '',
    );
    row(`deployment stage ${n}: ${start} → succeeded, ms`, d[`stage${n}_succeeded_ms`], '', undefined, '');
    row(
      `deployment stage ${n}: server CPU per device, ms`,
      d[`stage${n}_server_cpu_ms_per_device`],
      'full connect',
      s.handshake.full_server_cpu_ms,
      '',
    );
    row(`deployment stage ${n}: statements per device`, d[`stage${n}_statements_per_device`], '', undefined, '');
  }
  row('deployment: server RSS growth over the rollout, MiB', d.rss_growth_mib, '', undefined, 'bounded');
  const header = ['figure', 'fleethub', 'baseline', 'baseline value', 'ratio', 'target'];
  return [
    `| ${header.join(' | ')} |`,
    `|${header.map(() => '---').join('|')}|`,
    ...rows.map((r) => `| ${r.join(' | ')} |`),
  ].join('\n');
}
