// Devices: the filtered, paginated list that follows device_status live, and the devices
// waiting for an operator's approval.
import { apiPaths } from './api.js';
import { debounce, field, fill, h, select, table, time } from './dom.js';

const PAGE = 50;

function statusBadge(status) {
  return h('span', { class: `badge ${status}` }, status);
}

function deviceRow(d) {
  return h(
    'tr',
    { 'data-device-id': d.id },
    h('th', { scope: 'row' }, d.identifier),
    h('td', { 'data-col': 'status' }, statusBadge(d.connection_status)),
    h('td', { 'data-col': 'version' }, d.firmware_version ?? '—'),
    h('td', {}, d.protocol),
    h('td', {}, h('span', { class: `badge ${d.approval}` }, d.approval)),
    h('td', { 'data-col': 'seen' }, time(d.last_seen_at)),
  );
}

/** The device list: filters by group, version, status and search; pages of 50; live status. */
export function devicesView(ctx) {
  const filters = { group: '', version: '', status: '', q: '' };
  let offset = 0;
  let generation = 0;
  const results = h('div', { 'aria-live': 'off' });
  const pager = h('div', { class: 'pager' });
  const groupSelect = select({ name: 'group' }, [['', 'Any group']]);
  const versions = h('datalist', { id: 'known-versions' });
  const form = h(
    'form',
    { class: 'filters', role: 'search', 'aria-label': 'Filter devices' },
    field('Group', groupSelect),
    field('Version', h('input', { name: 'version', list: 'known-versions', autocomplete: 'off' })),
    field(
      'Status',
      select({ name: 'status' }, [
        ['', 'Any'],
        ['online', 'Online'],
        ['offline', 'Offline'],
      ]),
    ),
    field('Search', h('input', { name: 'q', type: 'search', placeholder: 'identifier or description' })),
    versions,
  );
  const apply = () => {
    const data = new FormData(form);
    for (const key of Object.keys(filters)) filters[key] = String(data.get(key) ?? '').trim();
    offset = 0;
    load().catch(ctx.failed);
  };
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    apply();
  });
  form.addEventListener('change', apply);
  form.addEventListener('input', debounce(apply, 300));

  async function load() {
    const mine = ++generation;
    const page = await ctx.get(['devices'], { product: ctx.productId, ...filters, limit: PAGE, offset });
    if (mine !== generation) return; // a newer load is under way
    fill(
      results,
      table(
        'Devices',
        ['Identifier', 'Status', 'Version', 'Protocol', 'Approval', 'Last seen'],
        page.items.map(deviceRow),
        'No device matches these filters.',
      ),
    );
    const last = Math.min(offset + page.items.length, page.total);
    fill(
      pager,
      h('span', {}, page.total ? `Showing ${offset + 1}–${last} of ${page.total}` : ''),
      h(
        'button',
        {
          type: 'button',
          class: 'secondary',
          disabled: offset === 0,
          onclick: () => {
            offset = Math.max(0, offset - PAGE);
            load().catch(ctx.failed);
          },
        },
        'Previous',
      ),
      h(
        'button',
        {
          type: 'button',
          class: 'secondary',
          disabled: last >= page.total,
          onclick: () => {
            offset += PAGE;
            load().catch(ctx.failed);
          },
        },
        'Next',
      ),
    );
  }

  async function refresh() {
    const [groups, firmware] = await Promise.all([
      ctx.get(['groups'], { product: ctx.productId, limit: 1000 }),
      ctx.get(['firmware'], { product: ctx.productId, limit: 1000 }),
    ]);
    fill(
      groupSelect,
      h('option', { value: '' }, 'Any group'),
      groups.items.map((g) => h('option', { value: g.id, selected: g.id === filters.group }, g.name)),
    );
    fill(
      versions,
      [...new Set(firmware.items.map((f) => f.version))].map((v) => h('option', { value: v })),
    );
    await load();
  }

  const reload = debounce(() => load().catch(ctx.failed), 250);
  return {
    el: h(
      'section',
      { 'aria-labelledby': 'devices-title' },
      h('h2', { id: 'devices-title' }, 'Devices'),
      form,
      results,
      pager,
    ),
    refresh,
    onEvent(event, payload) {
      if (event === 'device_status') {
        // Show the change at once; the reload then applies filters and brings in new devices.
        const row = results.querySelector(`tr[data-device-id="${CSS.escape(String(payload.device_id))}"]`);
        if (row) {
          fill(row.querySelector('[data-col=status]'), statusBadge(payload.status));
          if (payload.version) fill(row.querySelector('[data-col=version]'), payload.version);
          fill(row.querySelector('[data-col=seen]'), time(new Date().toISOString()));
        }
      }
      if (['device_status', 'device_registered', 'device_approved', 'device_revoked', 'resync'].includes(event))
        reload();
    },
  };
}

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

/** An approve route and a reject (or revoke) route under `base` + `{device}/`, or null. */
function routePair(paths, base) {
  const find = (verbs) => paths.find((p) => new RegExp(`^${escapeRegExp(base)}\\{[^}]+\\}/(${verbs})$`).test(p));
  const approve = find('approve');
  const reject = find('reject|revoke');
  return approve && reject ? { approve, reject } : null;
}

/**
 * How to approve a device on this server, read from its OpenAPI document: a generic
 * `/orgs/{org}/devices/{device}/approve` when there is one, else its edge's own
 * `/<protocol>/devices/{device}/approve` (e.g. Main Server). Null when neither exists.
 */
async function approvalRoutes() {
  const paths = Object.keys(await apiPaths()).map((p) => p.replace(/^\/api\/v1/, ''));
  const generic = routePair(paths, '/orgs/{org}/devices/');
  return (device) => generic ?? routePair(paths, `/${device.protocol}/devices/`);
}

/** Devices whose approval is `pending` (edge devices that registered themselves), with Approve and Reject. */
export function pendingView(ctx) {
  const results = h('div');
  const note = h('p', { class: 'hint', id: 'approval-note' });

  async function act(route, device, verb) {
    const path = route
      .replace('{org}', encodeURIComponent(ctx.orgId))
      .replace(/\{[^}]+\}/, encodeURIComponent(device.id));
    await ctx.request('POST', path);
    ctx.notify(`${device.identifier} ${verb}.`);
    await refresh();
  }

  async function refresh() {
    const [routesFor, pending] = await Promise.all([approvalRoutes(), pendingDevices(ctx)]);
    const without = [...new Set(pending.filter((d) => !routesFor(d)).map((d) => d.protocol))];
    fill(
      note,
      without.length
        ? `This server's API has no approval route for ${without.join(', ')} devices yet, so their buttons are disabled. Use the edge's CLI command meanwhile (e.g. fleethub keyauth approve).`
        : '',
    );
    const button = (label, verb, route, d) =>
      h(
        'button',
        {
          type: 'button',
          class: verb === 'rejected' ? 'danger' : '',
          disabled: !route,
          'aria-describedby': route ? false : 'approval-note',
          'aria-label': `${label} ${d.identifier}`,
          onclick: () => act(route, d, verb).catch(ctx.failed),
        },
        label,
      );
    const rows = pending.map((d) => {
      const routes = routesFor(d);
      return h(
        'tr',
        { 'data-device-id': d.id },
        h('th', { scope: 'row' }, d.identifier),
        h('td', {}, ctx.productName(d.product_id)),
        h('td', {}, d.protocol),
        h('td', {}, time(d.created_at)),
        h(
          'td',
          { class: 'actions' },
          button('Approve', 'approved', routes?.approve, d),
          button('Reject', 'rejected', routes?.reject, d),
        ),
      );
    });
    fill(
      results,
      table(
        'Pending devices',
        ['Identifier', 'Product', 'Protocol', 'Registered', 'Actions'],
        rows,
        'No device is waiting for approval.',
      ),
    );
  }

  const reload = debounce(() => refresh().catch(ctx.failed), 250);
  return {
    el: h(
      'section',
      { 'aria-labelledby': 'pending-title' },
      h('h2', { id: 'pending-title' }, 'Pending devices'),
      note,
      results,
    ),
    refresh,
    onEvent(event) {
      if (['device_registered', 'device_approved', 'device_revoked', 'resync'].includes(event)) reload();
    },
  };
}

/** Devices waiting for an operator (the first 1000; approving them shows the next). */
async function pendingDevices(ctx) {
  const page = await ctx.get(['devices'], { product: ctx.productId, approval: 'pending', limit: 1000 });
  return page.items;
}
