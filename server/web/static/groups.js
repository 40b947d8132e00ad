// Groups: create and delete them, manage members, retarget their firmware, and follow the
// update attempts of the selected group live (counts by state, a progress bar per device).
import { debounce, field, fill, h, select, table, time } from './dom.js';

const FINAL_STATES = ['succeeded', 'failed', 'rolled_back', 'timed_out', 'cancelled'];

export function groupsView(ctx, [selectedId]) {
  let groups = [];
  let targets = [];
  let firmware = [];
  const list = h('div');
  const detail = h('div', { class: 'detail' });
  let shown = null; // the detail panel of the selected group: { group, refresh, onEvent }

  const targetOf = (groupId) => targets.find((t) => t.group_id === groupId && t.component === 'firmware');
  const versionOf = (firmwareId) => firmware.find((f) => f.id === firmwareId)?.version ?? firmwareId;

  const productChoices = ctx.productId ? ctx.products.filter((p) => p.id === ctx.productId) : ctx.products;
  const createForm = h(
    'form',
    { class: 'inline', 'aria-labelledby': 'new-group-title' },
    h('h3', { id: 'new-group-title' }, 'New group'),
    field(
      'Name',
      h('input', {
        name: 'name',
        required: true,
        maxlength: 63,
        pattern: '[A-Za-z0-9][A-Za-z0-9._-]*',
        autocomplete: 'off',
      }),
    ),
    field(
      'Product',
      select(
        { name: 'product' },
        productChoices.map((p) => [p.id, p.name]),
        ctx.productId,
      ),
    ),
    h('button', { type: 'submit' }, 'Create group'),
  );
  createForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const data = new FormData(createForm);
    try {
      const group = await ctx.send('POST', ['groups'], {
        name: String(data.get('name')).trim(),
        product: String(data.get('product')),
      });
      createForm.reset();
      ctx.notify(`Group ${group.name} created.`);
      ctx.go(`groups/${group.id}`);
    } catch (err) {
      ctx.failed(err);
    }
  });

  async function remove(group) {
    if (!confirm(`Delete group ${group.name}? Its ${group.device_count} device(s) stay, without this group's target.`))
      return;
    await ctx.send('DELETE', ['groups', group.id]);
    ctx.notify(`Group ${group.name} deleted.`);
    if (group.id === selectedId) ctx.go('groups');
    else await refresh();
  }

  function renderList() {
    const rows = groups.map((g) => {
      const target = targetOf(g.id);
      return h(
        'tr',
        { 'data-group-id': g.id, class: g.id === selectedId ? 'selected' : false },
        h(
          'th',
          { scope: 'row' },
          h(
            'a',
            { href: `#groups/${encodeURIComponent(g.id)}`, 'aria-current': g.id === selectedId ? 'true' : false },
            g.name,
          ),
        ),
        h('td', {}, ctx.productName(g.product_id)),
        h('td', {}, String(g.device_count)),
        h('td', { 'data-col': 'target' }, target ? versionOf(target.firmware_id) : 'none'),
        h(
          'td',
          { class: 'actions' },
          h(
            'button',
            {
              type: 'button',
              class: 'danger',
              'aria-label': `Delete group ${g.name}`,
              onclick: () => remove(g).catch(ctx.failed),
            },
            'Delete',
          ),
        ),
      );
    });
    fill(
      list,
      table('Groups', ['Name', 'Product', 'Devices', 'Target', 'Actions'], rows, 'No groups yet: create one below.'),
    );
  }

  async function refresh() {
    [groups, targets, firmware] = await Promise.all([
      ctx.get(['groups'], { product: ctx.productId, limit: 1000 }).then((r) => r.items),
      ctx.get(['targets'], { limit: 1000 }).then((r) => r.items),
      ctx.get(['firmware'], { limit: 1000 }).then((r) => r.items),
    ]);
    renderList();
    const group = groups.find((g) => g.id === selectedId);
    if (!group) {
      fill(
        detail,
        selectedId
          ? h('p', { class: 'empty' }, 'That group no longer exists.')
          : h('p', { class: 'empty' }, 'Select a group to manage its target, members and updates.'),
      );
      shown = null;
      return;
    }
    if (shown?.group.id !== group.id) {
      shown = groupDetail(ctx, group, { targetOf, firmware: () => firmware, versionOf, changed: () => reloadAll() });
      fill(detail, shown.el);
    }
    shown.group = group;
    await shown.refresh();
  }

  const reloadAll = debounce(() => refresh().catch(ctx.failed), 250);
  return {
    el: h(
      'section',
      { 'aria-labelledby': 'groups-title' },
      h('h2', { id: 'groups-title' }, 'Groups & updates'),
      h('div', { class: 'split' }, h('div', {}, list, createForm), detail),
    ),
    refresh,
    onEvent(event, payload) {
      if (['target_changed', 'group_deleted', 'firmware_created', 'resync'].includes(event)) reloadAll();
      else shown?.onEvent(event, payload);
    },
  };
}

/** One group: its target, its update attempts (live) and its members. */
function groupDetail(ctx, group, shared) {
  const targetInfo = h('p', { 'data-col': 'target' });
  const firmwareSelect = select({ name: 'firmware' }, []);
  const clearButton = h(
    'button',
    { type: 'button', class: 'secondary', onclick: () => clearTarget().catch(ctx.failed) },
    'Clear target',
  );
  const targetForm = h(
    'form',
    { class: 'inline' },
    field('Firmware version', firmwareSelect),
    h('button', { type: 'submit' }, 'Set target'),
    clearButton,
  );
  targetForm.addEventListener('submit', (e) => {
    e.preventDefault();
    setTarget().catch(ctx.failed);
  });
  const counts = h('dl', { class: 'counts' });
  const attempts = h('div');
  const members = h('div');
  const addInput = h('input', {
    name: 'devices',
    required: true,
    autocomplete: 'off',
    placeholder: 'serial-1, serial-2',
  });
  const addForm = h(
    'form',
    { class: 'inline' },
    field('Add devices (identifiers or ids, comma-separated)', addInput),
    h('button', { type: 'submit' }, 'Add'),
  );
  addForm.addEventListener('submit', (e) => {
    e.preventDefault();
    addMembers().catch(ctx.failed);
  });
  let identifiers = new Map(); // device id → identifier, for the attempts table

  const self = {
    group,
    el: h(
      'article',
      { 'aria-labelledby': 'group-title' },
      h('h3', { id: 'group-title' }, `Group ${group.name}`),
      h(
        'section',
        { 'aria-labelledby': 'target-title' },
        h('h4', { id: 'target-title' }, 'Target firmware'),
        targetInfo,
        targetForm,
      ),
      h(
        'section',
        { 'aria-labelledby': 'updates-title' },
        h('h4', { id: 'updates-title' }, 'Update attempts'),
        counts,
        attempts,
      ),
      h(
        'section',
        { 'aria-labelledby': 'members-title' },
        h('h4', { id: 'members-title' }, 'Members'),
        members,
        addForm,
      ),
    ),
    refresh,
    onEvent,
  };

  async function setTarget() {
    const change = await ctx.send('PUT', ['groups', group.id, 'target'], { firmware_id: firmwareSelect.value });
    ctx.notify(
      `Group ${group.name} now targets ${shared.versionOf(firmwareSelect.value)}: ${change.attempts.sent} update(s) sent, ${change.attempts.queued} queued.`,
    );
    shared.changed();
  }

  async function clearTarget() {
    await ctx.send('DELETE', ['groups', group.id, 'target']);
    ctx.notify(`Group ${group.name} has no target any more.`);
    shared.changed();
  }

  async function addMembers() {
    const refs = addInput.value.split(/[\s,]+/).filter(Boolean);
    if (refs.length === 0) return;
    const { added } = await ctx.send('POST', ['groups', group.id, 'devices'], { devices: refs });
    addInput.value = '';
    ctx.notify(`${added.length} device(s) added to ${group.name}.`);
    shared.changed();
  }

  async function removeMember(device) {
    await ctx.send('POST', ['groups', group.id, 'devices', 'remove'], { devices: [device.id] });
    ctx.notify(`${device.identifier} removed from ${group.name}.`);
    shared.changed();
  }

  async function refresh() {
    const [status, page, history] = await Promise.all([
      ctx.get(['groups', group.id, 'status']),
      ctx.get(['groups', group.id, 'devices'], { limit: 1000 }),
      ctx.get(['groups', group.id, 'updates'], { limit: 100 }),
    ]);
    identifiers = new Map(page.items.map((d) => [d.id, d.identifier]));
    const target = shared.targetOf(group.id);
    fill(
      targetInfo,
      target
        ? `Runs ${shared.versionOf(target.firmware_id)} (set ${new Date(target.set_at).toLocaleString()})`
        : 'No target: members keep the firmware they run.',
    );
    const choices = shared
      .firmware()
      .filter((f) => f.product_id === group.product_id && f.component === 'firmware' && f.has_blob);
    fill(
      firmwareSelect,
      choices.map((f) => h('option', { value: f.id, selected: f.id === target?.firmware_id }, f.version)),
    );
    clearButton.hidden = !target;
    const nonZero = Object.entries(status.updates).filter(([, n]) => n > 0);
    fill(
      counts,
      h('dt', {}, 'online'),
      h('dd', { 'data-state': 'online' }, `${status.online} of ${status.devices}`),
      nonZero.map(([state, n]) => [h('dt', {}, state.replace('_', ' ')), h('dd', { 'data-state': state }, String(n))]),
    );
    fill(
      attempts,
      table(
        'Update attempts',
        ['Device', 'Update', 'State', 'Progress', 'Updated'],
        history.items.map(attemptRow),
        'No update attempts yet.',
      ),
    );
    const memberRows = page.items.map((d) =>
      h(
        'tr',
        { 'data-device-id': d.id },
        h('th', { scope: 'row' }, d.identifier),
        h('td', { 'data-col': 'status' }, h('span', { class: `badge ${d.connection_status}` }, d.connection_status)),
        h('td', {}, d.firmware_version ?? '—'),
        h(
          'td',
          { class: 'actions' },
          h(
            'button',
            {
              type: 'button',
              class: 'secondary',
              'aria-label': `Remove ${d.identifier} from ${group.name}`,
              onclick: () => removeMember(d).catch(ctx.failed),
            },
            'Remove',
          ),
        ),
      ),
    );
    fill(members, table('Members', ['Identifier', 'Status', 'Version', 'Actions'], memberRows, 'No members yet.'));
  }

  function attemptRow(a) {
    const name = identifiers.get(a.device_id) ?? a.device_id;
    return h(
      'tr',
      { 'data-attempt-id': a.id, 'data-state': a.state },
      h('th', { scope: 'row' }, name),
      h('td', {}, `${a.from_version ?? '?'} → ${a.to_version}`),
      h('td', { 'data-col': 'state' }, h('span', { class: `badge ${a.state}` }, a.state)),
      h('td', { 'data-col': 'progress' }, progress(a, name)),
      h('td', { 'data-col': 'updated' }, time(a.updated_at)),
    );
  }

  const reload = debounce(() => refresh().catch(ctx.failed), 500);

  function onEvent(event, payload) {
    if (event === 'update_transition') {
      const row = attempts.querySelector(`tr[data-attempt-id="${CSS.escape(String(payload.id))}"]`);
      if (row) {
        const name = row.querySelector('th').textContent;
        const stateChanged = row.dataset.state !== payload.state;
        row.dataset.state = payload.state;
        fill(row.querySelector('[data-col=state]'), h('span', { class: `badge ${payload.state}` }, payload.state));
        fill(row.querySelector('[data-col=progress]'), progress(payload, name));
        fill(row.querySelector('[data-col=updated]'), time(new Date().toISOString()));
        if (stateChanged) reload(); // the counts by state moved
      } else if (identifiers.has(payload.device_id)) reload(); // a new attempt of a member
    } else if (event === 'device_status') {
      const cell = members.querySelector(
        `tr[data-device-id="${CSS.escape(String(payload.device_id))}"] [data-col=status]`,
      );
      if (cell) {
        fill(cell, h('span', { class: `badge ${payload.status}` }, payload.status));
        reload();
      }
    }
  }

  return self;
}

/** A labelled progress bar: the attempt's percent, full when it succeeded, empty before it began. */
function progress(attempt, deviceName) {
  const percent = attempt.state === 'succeeded' || attempt.state === 'finished' ? 100 : (attempt.percent ?? 0);
  const done = FINAL_STATES.includes(attempt.state) && attempt.state !== 'succeeded';
  return h(
    'span',
    { class: 'progress' },
    h('progress', {
      max: 100,
      value: percent,
      'aria-label': `Update progress of ${deviceName}`,
      class: done ? 'stopped' : false,
    }),
    h('span', { class: 'percent' }, `${percent}%`),
  );
}
