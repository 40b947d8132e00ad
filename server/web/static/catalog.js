// Firmware records and the audit log: read-only lists that refresh when the fleet changes.
import { bytes, debounce, fill, h, table, time } from './dom.js';

export function firmwareView(ctx) {
  const results = h('div');
  async function refresh() {
    const { items } = await ctx.get(['firmware'], { product: ctx.productId, limit: 1000 });
    const rows = items.map((f) =>
      h(
        'tr',
        { 'data-firmware-id': f.id },
        h('th', { scope: 'row' }, f.version),
        h('td', {}, ctx.productName(f.product_id)),
        h('td', {}, f.component),
        h('td', {}, [f.platform, f.architecture].filter(Boolean).join(' / ') || '—'),
        h('td', {}, f.has_blob ? bytes(f.size) : 'no image'),
        h('td', {}, f.sha256 ? h('code', { class: 'hash', title: f.sha256 }, f.sha256) : '—'),
        h('td', {}, time(f.uploaded_at)),
      ),
    );
    fill(
      results,
      table(
        'Firmware',
        ['Version', 'Product', 'Component', 'Platform', 'Size', 'SHA-256', 'Uploaded'],
        rows,
        'No firmware uploaded yet: use `fleethub firmware upload`.',
      ),
    );
  }
  const reload = debounce(() => refresh().catch(ctx.failed), 250);
  return {
    el: h('section', { 'aria-labelledby': 'firmware-title' }, h('h2', { id: 'firmware-title' }, 'Firmware'), results),
    refresh,
    onEvent(event) {
      if (event === 'firmware_created' || event === 'resync') reload();
    },
  };
}

const AUDIT_PAGE = 50;

function actor(entry) {
  return entry.actor_id ? `${entry.actor_type} ${entry.actor_id}` : entry.actor_type;
}

export function auditView(ctx) {
  const results = h('div');
  const pager = h('div', { class: 'pager' });
  let offset = 0;

  async function refresh() {
    const page = await ctx.get(['audit'], { limit: AUDIT_PAGE, offset });
    const rows = page.items.map((e) =>
      h(
        'tr',
        {},
        h('td', {}, time(e.at)),
        h('td', {}, actor(e)),
        h('th', { scope: 'row' }, e.action),
        h('td', {}, e.resource_type ? `${e.resource_type} ${e.resource_id ?? ''}` : '—'),
        h('td', {}, h('code', { class: 'details' }, JSON.stringify(e.details ?? {}))),
      ),
    );
    fill(
      results,
      table('Audit log', ['When', 'Actor', 'Action', 'Resource', 'Details'], rows, 'The audit log is empty.'),
    );
    const last = offset + page.items.length;
    fill(
      pager,
      h('span', {}, page.total ? `Entries ${offset + 1}–${last} of ${page.total}, newest first` : ''),
      h(
        'button',
        {
          type: 'button',
          class: 'secondary',
          disabled: offset === 0,
          onclick: () => {
            offset = Math.max(0, offset - AUDIT_PAGE);
            refresh().catch(ctx.failed);
          },
        },
        'Newer',
      ),
      h(
        'button',
        {
          type: 'button',
          class: 'secondary',
          disabled: last >= page.total,
          onclick: () => {
            offset += AUDIT_PAGE;
            refresh().catch(ctx.failed);
          },
        },
        'Older',
      ),
    );
  }

  // Operator actions publish events; the first page follows them (older pages stay put while read).
  const reload = debounce(() => offset === 0 && refresh().catch(ctx.failed), 1000);
  return {
    el: h('section', { 'aria-labelledby': 'audit-title' }, h('h2', { id: 'audit-title' }, 'Audit log'), results, pager),
    refresh,
    onEvent: reload,
  };
}
