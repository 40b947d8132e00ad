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
  clientFor,
  printJson,
  printRecord,
  printRows,
  type ApiClient,
  type CliIo,
  type CommonFlags,
} from './client.ts';
import { act, type CliContext, withServer } from './command.ts';

const enc = encodeURIComponent;

interface DeviceRow {
  device_id: string;
  name: string | null;
  approval: string;
  status: string;
  has_token: boolean;
  last_seen_at: string | null;
}

/** Calls `/api/main-server/*`, whose errors are `{error, details}`. */
async function seedCall<T>(client: ApiClient, method: string, pathname: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { accept: 'application/json' };
  if (client.options.token) headers.authorization = `Bearer ${client.options.token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  let res: Response;
  try {
    res = await fetch(`${client.options.url}/api/main-server${pathname}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new CliError(`cannot reach ${client.options.url} (${(err as Error).message}); check --url or FLEETHUB_URL`);
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

type Flags = CommonFlags & { pending?: boolean; name?: string; out?: string; device?: string };

export function registerMainServerCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const ms = program.command('main-server').description('Main Server devices and packages');
  const sub = (name: string, description: string) => withServer(ms.command(name).description(description));
  act<Flags>(sub('devices', 'Main Server devices').option('--pending', 'only the approval queue'), ctx, async (o) => {
    const { items } = await clientFor(o, io).get<{ items: DeviceRow[] }>('/api/v1/main-server/devices', {
      approval: o.pending ? 'pending' : undefined,
    });
    printRows(io, o.json, items, [
      { header: 'device_id', value: (d) => d.device_id },
      { header: 'name', value: (d) => d.name },
      { header: 'approval', value: (d) => d.approval },
      { header: 'status', value: (d) => d.status },
      { header: 'token', value: (d) => (d.has_token ? 'yes' : 'no') },
      { header: 'last seen', value: (d) => d.last_seen_at },
    ]);
  });
  for (const [name, description] of [
    ['approve', 'approve a registration (the device collects its token)'],
    ['revoke', 'revoke a device; its token stops working'],
  ] as const)
    act<Flags>(sub(name, description).argument('<device_id>'), ctx, async (o, [id]) => {
      const r = await clientFor(o, io).post<{ device: DeviceRow; message?: string }>(
        `/api/v1/main-server/devices/${enc(id as string)}/${name}`,
      );
      if (o.json) printJson(io, r);
      else io.out(`${r.device.device_id}: ${r.device.approval}${r.message ? `\n${r.message}` : ''}\n`);
    });
  const printToken = (o: Flags, r: { device: DeviceRow; device_token: string }) => {
    if (o.json) printJson(io, r);
    else io.out(`device ${r.device.device_id} token (shown once; give it to the device):\n${r.device_token}\n`);
  };
  act<Flags>(
    sub('rotate-token', 'issue a new token (printed once); the old one stops working').argument('<device_id>'),
    ctx,
    async (o, [id]) =>
      printToken(
        o,
        await clientFor(o, io).post<{ device: DeviceRow; device_token: string }>(
          `/api/v1/main-server/devices/${enc(id as string)}/token`,
        ),
      ),
  );
  act<Flags>(
    sub('add', 'pre-provision an approved device; prints its token once')
      .argument('<device_id>')
      .option('--name <name>', 'a display name'),
    ctx,
    async (o, [id]) =>
      printToken(
        o,
        await clientFor(o, io).post<{ device: DeviceRow; device_token: string }>('/api/v1/main-server/devices', {
          device_id: id,
          ...(o.name ? { name: o.name } : {}),
        }),
      ),
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
      const r = await clientFor(o, io).request<Record<string, unknown>>(
        'POST',
        '/api/v1/main-server/packages',
        readFileSync(file as string),
        'application/zip',
      );
      printRecord(io, o.json, r);
    },
  );
  act<Flags>(sub('extensions', 'extensions and their extension_id'), ctx, async (o) => {
    const { items } = await clientFor(o, io).get<{ items: Array<{ id: number; name: string }> }>(
      '/api/v1/main-server/extensions',
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
      const { updates } = await seedCall<{ updates: Array<Record<string, unknown>> }>(
        clientFor(o, io),
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
      const r = await seedCall<Record<string, unknown>>(clientFor(o, io), 'POST', '/schedule-update', {
        extension_id: Number(ext),
        new_version: version,
      });
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
      const r = await seedCall<Record<string, unknown>>(clientFor(o, io), 'POST', '/deploy-update', {
        device_id: id,
        extension_id: Number(ext),
        version,
      });
      printRecord(io, o.json, r);
    },
  );
}
