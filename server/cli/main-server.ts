/**
 * `fleethub main-server <sub>`: the Main Server edge (seed 000) for operators — approval queue,
 * approve / revoke / rotate-token / add (tokens are printed once), packages (pack a directory
 * into a ZIP, upload), extensions, updates, schedule and deploy.
 */
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { createZip, MANIFEST_NAME, parseManifest } from '../../shared/main-server-package.ts';
import {
  CliError,
  clientFor,
  helpRequested,
  parseCommand,
  printJson,
  printRecord,
  printRows,
  processIo,
  runCommand,
  usageError,
  type ApiClient,
  type CliIo,
} from './client.ts';

const USAGE = `Usage:
  fleethub main-server devices [--pending]              Main Server devices (the approval queue with --pending)
  fleethub main-server approve <device_id>             approve a registration (the device collects its token)
  fleethub main-server revoke <device_id>              revoke a device; its token stops working
  fleethub main-server rotate-token <device_id>        issue a new token (printed once); the old one stops working
  fleethub main-server add <device_id> [--name N]      pre-provision an approved device; prints its token once
  fleethub main-server pack <dir> [--out FILE.zip]     build a package from a directory holding ${MANIFEST_NAME}
  fleethub main-server upload <package.zip>            upload a package (validated on the server)
  fleethub main-server extensions                      extensions and their extension_id
  fleethub main-server updates [--device D]            current vs available versions
  fleethub main-server schedule <extension_id> <version>
  fleethub main-server deploy <device_id> <extension_id> <version>
Options: --json --url --token`;

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

export async function runMainServerCommand(argv: string[], io: CliIo = processIo): Promise<number> {
  return runCommand(io, async () => {
    const { values, positionals } = parseCommand(
      argv,
      { pending: { type: 'boolean' }, name: { type: 'string' }, out: { type: 'string' }, device: { type: 'string' } },
      USAGE,
    );
    const help = helpRequested(values, USAGE, io);
    if (help !== undefined) return help;
    const [sub, a, b, c] = positionals;
    const need = (v: string | undefined, what: string) => {
      if (!v) throw usageError(`missing ${what}`, USAGE);
      return v;
    };
    if (sub === 'pack') {
      const dir = need(a, '<dir>');
      const manifest = parseManifest(JSON.parse(readFileSync(path.join(dir, MANIFEST_NAME), 'utf8')));
      const out = values.out ?? `${manifest.extension}-${manifest.version}.zip`;
      writeFileSync(out, createZip(filesOf(dir)));
      io.out(
        `${out}: ${manifest.extension} ${manifest.version}${manifest.compatible_with ? ` (compatible with ${manifest.compatible_with})` : ''}\n`,
      );
      return 0;
    }
    const client = clientFor(values, io);
    switch (sub) {
      case 'devices': {
        const { items } = await client.get<{ items: DeviceRow[] }>('/api/v1/main-server/devices', {
          approval: values.pending ? 'pending' : undefined,
        });
        printRows(io, values.json, items, [
          { header: 'device_id', value: (d) => d.device_id },
          { header: 'name', value: (d) => d.name },
          { header: 'approval', value: (d) => d.approval },
          { header: 'status', value: (d) => d.status },
          { header: 'token', value: (d) => (d.has_token ? 'yes' : 'no') },
          { header: 'last seen', value: (d) => d.last_seen_at },
        ]);
        return 0;
      }
      case 'approve':
      case 'revoke': {
        const r = await client.post<{ device: DeviceRow; message?: string }>(
          `/api/v1/main-server/devices/${enc(need(a, '<device_id>'))}/${sub}`,
        );
        if (values.json) printJson(io, r);
        else io.out(`${r.device.device_id}: ${r.device.approval}${r.message ? `\n${r.message}` : ''}\n`);
        return 0;
      }
      case 'rotate-token':
      case 'add': {
        const r =
          sub === 'add'
            ? await client.post<{ device: DeviceRow; device_token: string }>('/api/v1/main-server/devices', {
                device_id: need(a, '<device_id>'),
                ...(values.name ? { name: values.name } : {}),
              })
            : await client.post<{ device: DeviceRow; device_token: string }>(
                `/api/v1/main-server/devices/${enc(need(a, '<device_id>'))}/token`,
              );
        if (values.json) printJson(io, r);
        else io.out(`device ${r.device.device_id} token (shown once; give it to the device):\n${r.device_token}\n`);
        return 0;
      }
      case 'upload': {
        const file = need(a, '<package.zip>');
        const r = await client.request<Record<string, unknown>>(
          'POST',
          '/api/v1/main-server/packages',
          readFileSync(file),
          'application/zip',
        );
        printRecord(io, values.json, r);
        return 0;
      }
      case 'extensions': {
        const { items } = await client.get<{ items: Array<{ id: number; name: string }> }>(
          '/api/v1/main-server/extensions',
        );
        printRows(io, values.json, items, [
          { header: 'extension_id', value: (e) => e.id },
          { header: 'name', value: (e) => e.name },
        ]);
        return 0;
      }
      case 'updates': {
        const { updates } = await seedCall<{ updates: Array<Record<string, unknown>> }>(
          client,
          'GET',
          values.device ? `/updates?device_id=${enc(values.device)}` : '/updates',
        );
        printRows(io, values.json, updates, [
          { header: 'device', value: (u) => u.device_id },
          { header: 'extension_id', value: (u) => u.extension_id },
          { header: 'name', value: (u) => u.name },
          { header: 'current', value: (u) => u.current_version },
          { header: 'available', value: (u) => u.available_version },
          { header: 'compatible', value: (u) => u.is_compatible },
        ]);
        return 0;
      }
      case 'schedule': {
        const r = await seedCall<Record<string, unknown>>(client, 'POST', '/schedule-update', {
          extension_id: Number(need(a, '<extension_id>')),
          new_version: need(b, '<version>'),
        });
        printRecord(io, values.json, r);
        return 0;
      }
      case 'deploy': {
        const r = await seedCall<Record<string, unknown>>(client, 'POST', '/deploy-update', {
          device_id: need(a, '<device_id>'),
          extension_id: Number(need(b, '<extension_id>')),
          version: need(c, '<version>'),
        });
        printRecord(io, values.json, r);
        return 0;
      }
      default:
        throw usageError(sub ? `unknown subcommand ${JSON.stringify(sub)}` : 'missing subcommand', USAGE);
    }
  });
}
