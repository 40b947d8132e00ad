// The dashboard shell: login, the org/product picker, section navigation (`#devices`,
// `#groups/<id>`, …) and the live socket whose events go to the section on screen.
import * as api from './api.js';
import { field, fill, h, select } from './dom.js';
import { Live } from './live.js';
import { devicesView, pendingView } from './devices.js';
import { groupsView } from './groups.js';
import { auditView, firmwareView } from './catalog.js';

const SECTIONS = [
  ['devices', 'Devices', devicesView],
  ['groups', 'Groups & updates', groupsView],
  ['firmware', 'Firmware', firmwareView],
  ['pending', 'Pending devices', pendingView],
  ['audit', 'Audit log', auditView],
];

const $ = (id) => document.getElementById(id);
let live = null;
let current = null; // { name, view }
let orgs = [];
let products = [];
const liveStatus = h('span', { class: 'live', id: 'live-status', role: 'status' }, 'Connecting…');

/** Tells the operator what happened; errors stay until the next notice. */
function notify(text, kind = 'ok') {
  const el = $('notice');
  el.className = `notice ${kind}`;
  el.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  fill(el, text);
  if (kind !== 'error') setTimeout(() => el.textContent === text && fill(el), 5000);
}

function showLogin(message) {
  live?.close();
  live = null;
  current = null;
  api.logout();
  $('nav').hidden = true;
  fill($('context'));
  const error = h('p', { class: 'error', role: 'alert' }, message ?? '');
  const form = h(
    'form',
    { class: 'login', 'aria-labelledby': 'login-title' },
    h('h2', { id: 'login-title' }, 'Sign in'),
    field('Email', h('input', { name: 'email', type: 'email', autocomplete: 'username', required: true })),
    field(
      'Password',
      h('input', { name: 'password', type: 'password', autocomplete: 'current-password', required: true }),
    ),
    h('button', { type: 'submit' }, 'Sign in'),
    error,
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    try {
      await api.login(String(data.get('email')), String(data.get('password')));
      await start();
    } catch (err) {
      fill(error, err.message);
    }
  });
  fill($('main'), form);
  form.elements.email.focus();
}

async function start() {
  orgs = (await api.request('GET', '/orgs?limit=1000')).items;
  if (orgs.length === 0)
    return fill($('main'), h('p', {}, 'Your account cannot see any organization yet. Ask an admin to create one.'));
  const stored = sessionStorage.getItem('fleethub.org');
  const orgId = orgs.some((o) => o.id === stored) ? stored : orgs[0].id;
  live = new Live(api.token());
  live.on((event, payload) => current?.view.onEvent?.(event, payload));
  live.onStatus((status) => {
    liveStatus.dataset.state = status;
    liveStatus.textContent =
      { live: 'Live', reconnecting: 'Reconnecting…', joining: 'Connecting…', connected: 'Connecting…' }[status] ??
      status;
  });
  await chooseOrg(orgId);
}

async function chooseOrg(orgId) {
  sessionStorage.setItem('fleethub.org', orgId);
  products = (await api.request('GET', `${api.orgPath(orgId, 'products')}?limit=1000`)).items;
  const storedProduct = sessionStorage.getItem('fleethub.product') ?? '';
  const productId = products.some((p) => p.id === storedProduct) ? storedProduct : '';
  renderContext(orgId, productId);
  live.watch(orgId);
  route();
}

function renderContext(orgId, productId) {
  const orgSelect = select(
    { id: 'org' },
    orgs.map((o) => [o.id, o.name]),
    orgId,
  );
  orgSelect.addEventListener('change', () => chooseOrg(orgSelect.value).catch(failed));
  const productSelect = select(
    { id: 'product' },
    [['', 'All products'], ...products.map((p) => [p.id, p.name])],
    productId,
  );
  productSelect.addEventListener('change', () => {
    sessionStorage.setItem('fleethub.product', productSelect.value);
    route();
  });
  fill(
    $('context'),
    field('Organization', orgSelect),
    field('Product', productSelect),
    liveStatus,
    h(
      'button',
      { type: 'button', class: 'secondary', onclick: () => api.signOut().then(() => showLogin('You signed out.')) },
      'Sign out',
    ),
  );
}

/** What every section gets: the org and product on screen, and how to reach the API. */
function context() {
  const orgId = $('org').value;
  const productId = $('product').value;
  return {
    orgId,
    productId,
    products,
    productName: (id) => products.find((p) => p.id === id)?.name ?? id,
    /** GET /api/v1/orgs/<org>/<segments…>?<params>. */
    get: (segments, params = {}) => api.request('GET', api.orgPath(orgId, ...segments) + api.query(params)),
    send: (method, segments, body) => api.request(method, api.orgPath(orgId, ...segments), body),
    request: api.request,
    notify,
    failed,
    go: (hash) => {
      location.hash = hash;
    },
  };
}

function failed(err) {
  notify(err.message ?? String(err), 'error');
}

/** Shows the section the hash names (`#groups/<id>` → groups, with `<id>` selected). */
function route() {
  if (!live || !$('org')) return;
  const [name, ...rest] = location.hash.slice(1).split('/');
  const section = SECTIONS.find(([key]) => key === name) ?? SECTIONS[0];
  const nav = $('nav');
  nav.hidden = false;
  fill(
    nav,
    h(
      'ul',
      {},
      SECTIONS.map(([key, label]) =>
        h('li', {}, h('a', { href: `#${key}`, 'aria-current': key === section[0] ? 'page' : false }, label)),
      ),
    ),
  );
  const view = section[2](context(), rest.map(decodeURIComponent));
  current = { name: section[0], view };
  fill($('main'), view.el);
  view.refresh().catch(failed);
}

api.whenUnauthorized((reason) =>
  showLogin(reason ? `Sign in again: ${reason}.` : 'Your session has ended. Sign in again.'),
);
window.addEventListener('hashchange', route);
// A refused token already went back to the sign-in form through whenUnauthorized.
if (api.token()) start().catch((err) => err.status !== 401 && failed(err));
else showLogin();
