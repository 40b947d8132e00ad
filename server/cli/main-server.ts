/**
 * `fleethub main-server <sub>`: the Main Server edge for operators — approval queue,
 * approve / revoke / rotate-token / add (tokens are printed once), packages (pack a directory
 * into a ZIP, upload), extensions, updates, schedule and deploy.
 */
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { createZip, MANIFEST_NAME, parseManifest } from '../../shared/main-server-package.ts';
import type { Command } from 'commander';
import {
  CliError,
  listRange,
  printJson,
  printRecord,
  printRows,
  resolveClientOptions,
  sessionFor,
  type CliIo,
  type ClientOptions,
  type CommonFlags,
} from './client.ts';
import { act, type CliContext, type PageFlags, paged, withServer } from './command.ts';

const enc = encodeURIComponent;

/**
 * Calls the Main Server protocol's own REST API (`/api/main-server/*`: updates, schedule-update,
 * deploy-update), which the protocol document defines, not the OpenAPI document of `/api/v1`;
 * its errors are `{error, details}`. Everything under `/api/v1/main-server` goes through the
 * generated client.
 */
async function protocolCall<T>(client: ClientOptions, method: string, pathname: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { accept: 'application/json' };
  if (client.token) headers.authorization = `Bearer ${client.token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  let res: Response;
  try {
    res = await fetch(`${client.url}/api/main-server${pathname}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new CliError(`cannot reach ${client.url} (${(err as Error).message}); check --url or FLEETHUB_URL`);
  }
  const parsed = (await res.json().catch(() => ({}))) as { error?: string; details?: string };
  if (!res.ok) throw new CliError(`${parsed.error ?? res.statusText}: ${parsed.details ?? ''}`.trim(), 1, res.status);
  return parsed as T;
}

/** Every file under `dir`, relative, with `/` separators. */
function filesOf(dir: string, prefix = ''): Array<{ name: string; data: Buffer }> {
  const out: Array<{ name: string; data: Buffer }> = [];
  for (const entry of readdirSync(path.join(dir, prefix)).sort()) {
    const rel = prefix ? `${prefix}/${entry}` : entry;
    const full = path.join(dir, rel);
    if (statSync(full).isDirectory()) out.push(...filesOf(dir, rel));
    else out.push({ name: rel, data: readFileSync(full) });
  }
  return out;
}

/** `fleethub main-server ...` as the CLI runs it (kept for callers of the old entry point). */
export async function runMainServerCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(['main-server', ...argv], io);
}

type Flags = CommonFlags & PageFlags & { pending?: boolean; name?: string; out?: string; device?: string };

export function registerMainServerCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const ms = program.command('main-server').description('Main Server devices and packages');
  const sub = (name: string, description: string) => withServer(ms.command(name).description(description));
  act<Flags>(
    paged(sub('devices', 'Main Server devices').option('--pending', 'only the approval queue')),
    ctx,
    async (o) => {
      const range = listRange(o);
      const { api, list } = sessionFor(o, io);
      const approval = o.pending ? ('pending' as const) : undefined;
      const { items } = await list(
        (page) => api.GET('/api/v1/main-server/devices', { params: { query: { ...page, approval } } }),
        range,
      );
      printRows(io, o.json, items, [
        { header: 'device_id', value: (d) => d.device_id },
        { header: 'name', value: (d) => d.name },
        { header: 'approval', value: (d) => d.approval },
        { header: 'status', value: (d) => d.status },
        { header: 'token', value: (d) => (d.has_token ? 'yes' : 'no') },
        { header: 'last seen', value: (d) => d.last_seen_at },
      ]);
    },
  );
  for (const [name, description] of [
    ['approve', 'approve a registration (the device collects its token)'],
    ['revoke', 'revoke a device; its token stops working'],
  ] as const)
    act<Flags>(sub(name, description).argument('<device_id>'), ctx, async (o, [id]) => {
      const { api, call } = sessionFor(o, io);
      const params = { path: { device: id as string } };
      const r =
        name === 'approve'
          ? await call(api.POST('/api/v1/main-server/devices/{device}/approve', { params }))
          : await call(api.POST('/api/v1/main-server/devices/{device}/revoke', { params }));
      if (o.json) printJson(io, r);
      else {
        const message = 'message' in r && typeof r.message === 'string' ? `\n${r.message}` : '';
        io.out(`${r.device?.device_id}: ${r.device?.approval}${message}\n`);
      }
    });
  const printToken = (o: Flags, r: { device?: { device_id?: string }; device_token?: string }) => {
    if (o.json) printJson(io, r);
    else io.out(`device ${r.device?.device_id} token (shown once; give it to the device):\n${r.device_token}\n`);
  };
  act<Flags>(
    sub('rotate-token', 'issue a new token (printed once); the old one stops working').argument('<device_id>'),
    ctx,
    async (o, [id]) => {
      const { api, call } = sessionFor(o, io);
      printToken(
        o,
        await call(
          api.POST('/api/v1/main-server/devices/{device}/token', { params: { path: { device: id as string } } }),
        ),
      );
    },
  );
  act<Flags>(
    sub('add', 'pre-provision an approved device; prints its token once')
      .argument('<device_id>')
      .option('--name <name>', 'a display name'),
    ctx,
    async (o, [id]) => {
      const { api, call } = sessionFor(o, io);
      printToken(
        o,
        await call(
          api.POST('/api/v1/main-server/devices', {
            body: { device_id: id as string, ...(o.name ? { name: o.name } : {}) },
          }),
        ),
      );
    },
  );
  act<{ out?: string }>(
    ms
      .command('pack')
      .description(`build a package from a directory holding ${MANIFEST_NAME}`)
      .argument('<dir>')
      .option('--out <file.zip>', 'the package (default <extension>-<version>.zip)'),
    ctx,
    async (o, [dir]) => {
      const manifest = parseManifest(JSON.parse(readFileSync(path.join(dir as string, MANIFEST_NAME), 'utf8')));
      const out = o.out ?? `${manifest.extension}-${manifest.version}.zip`;
      writeFileSync(out, createZip(filesOf(dir as string)));
      io.out(
        `${out}: ${manifest.extension} ${manifest.version}${manifest.compatible_with ? ` (compatible with ${manifest.compatible_with})` : ''}\n`,
      );
    },
  );
  act<Flags>(
    sub('upload', 'upload a package (validated on the server)').argument('<package.zip>'),
    ctx,
    async (o, [file]) => {
      const { api, call } = sessionFor(o, io);
      const r = await call(
        api.POST('/api/v1/main-server/packages', {
          body: readFileSync(file as string),
          bodySerializer: (bytes) => bytes as BodyInit,
          headers: { 'content-type': 'application/zip' },
        }),
      );
      printRecord(io, o.json, r);
    },
  );
  act<Flags>(paged(sub('extensions', 'extensions and their extension_id')), ctx, async (o) => {
    const range = listRange(o);
    const { api, list } = sessionFor(o, io);
    const { items } = await list(
      (page) => api.GET('/api/v1/main-server/extensions', { params: { query: page } }),
      range,
    );
    printRows(io, o.json, items, [
      { header: 'extension_id', value: (e) => e.id },
      { header: 'name', value: (e) => e.name },
    ]);
  });
  act<Flags>(
    sub('updates', 'current vs available versions').option('--device <device_id>', 'one device'),
    ctx,
    async (o) => {
      const { updates } = await protocolCall<{ updates: Array<Record<string, unknown>> }>(
        resolveClientOptions(o, io.env),
        'GET',
        o.device ? `/updates?device_id=${enc(o.device)}` : '/updates',
      );
      printRows(io, o.json, updates, [
        { header: 'device', value: (u) => u.device_id },
        { header: 'extension_id', value: (u) => u.extension_id },
        { header: 'name', value: (u) => u.name },
        { header: 'current', value: (u) => u.current_version },
        { header: 'available', value: (u) => u.available_version },
        { header: 'compatible', value: (u) => u.is_compatible },
      ]);
    },
  );
  act<Flags>(
    sub('schedule', 'schedule an update of an extension').argument('<extension_id>').argument('<version>'),
    ctx,
    async (o, [ext, version]) => {
      const r = await protocolCall<Record<string, unknown>>(
        resolveClientOptions(o, io.env),
        'POST',
        '/schedule-update',
        {
          extension_id: Number(ext),
          new_version: version,
        },
      );
      printRecord(io, o.json, r);
    },
  );
  act<Flags>(
    sub('deploy', 'deploy a version of an extension to a device')
      .argument('<device_id>')
      .argument('<extension_id>')
      .argument('<version>'),
    ctx,
    async (o, [id, ext, version]) => {
      const r = await protocolCall<Record<string, unknown>>(resolveClientOptions(o, io.env), 'POST', '/deploy-update', {
        device_id: id,
        extension_id: Number(ext),
        version,
      });
      printRecord(io, o.json, r);
    },
  );
}
