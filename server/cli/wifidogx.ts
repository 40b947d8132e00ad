/** WiFiDogX operator commands: `fleethub wifidogx <subcommand> <device>` (<device>: id or device_id). */
import type { Command } from 'commander';
import {
  clientFor,
  orgOf,
  orgPath,
  printJson,
  printRecord,
  printRows,
  usageError,
  type CliIo,
  type CommonFlags,
} from './client.ts';
import { act, type CliContext, withOrg } from './command.ts';

const enc = encodeURIComponent;

/** `fleethub wifidogx ...` as the CLI runs it (kept for callers of the old entry point). */
export async function runWifidogxCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(['wifidogx', ...argv], io);
}

type Flags = CommonFlags & {
  authToken?: string;
  clientIp?: string;
  clientMac?: string;
  gwId?: string;
  once?: boolean;
  timeout?: string;
  force?: boolean;
  limit?: string;
  firmwareUrl?: string;
};

export function registerWifidogxCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  const wifidogx = program.command('wifidogx').description('WiFiDogX gateways');
  const sub = (name: string, description: string) =>
    withOrg(wifidogx.command(name).description(description).argument('<device>', 'id or device_id'));
  const api = async (o: Flags, device: unknown) => {
    const client = clientFor(o, io);
    const base = `${orgPath(await orgOf(client, o, io))}/wifidogx/devices/${enc(device as string)}`;
    const command = async (body: Record<string, unknown>) =>
      printRecord(io, o.json, await client.post<Record<string, unknown>>(`${base}/commands`, body));
    return { client, base, command };
  };
  const required = (o: Flags, flags: Array<[keyof Flags, string]>) => {
    const missing = flags.filter(([k]) => o[k] === undefined).map(([, f]) => f);
    if (missing.length) throw usageError(`missing ${missing.join(', ')}`);
  };

  act<Flags>(sub('show', 'device info, gateways, auth modes, firmware info, recent commands'), ctx, async (o, [d]) => {
    const { client, base } = await api(o, d);
    if (o.json) printJson(io, await client.get(base));
    else printRecord(io, false, await client.get<Record<string, unknown>>(base));
  });
  act<Flags>(
    sub('approve', 'approve a pending gateway (prints its credential under the secure policy)'),
    ctx,
    async (o, [d]) => {
      const { client, base } = await api(o, d);
      const { credential, ...device } = await client.post<
        Record<string, unknown> & { credential?: Record<string, unknown> }
      >(`${base}/approve`);
      if (o.json) return printJson(io, credential ? { ...device, credential } : device);
      printRecord(io, false, device);
      if (credential) printCredential(io, credential);
    },
  );
  act<Flags>(
    sub('credential', "issue or rotate the gateway's credential (shown once; closes its link)"),
    ctx,
    async (o, [d]) => {
      const { client, base } = await api(o, d);
      const credential = await client.post<Record<string, unknown>>(`${base}/credential`);
      if (o.json) printJson(io, credential);
      else printCredential(io, credential);
    },
  );
  for (const [name, description] of [
    ['revoke', 'revoke a gateway'],
    ['release', 'close its current link so another claim of its device_id may connect'],
  ] as const)
    act<Flags>(sub(name, description), ctx, async (o, [d]) => {
      const { client, base } = await api(o, d);
      printRecord(io, o.json, await client.post<Record<string, unknown>>(`${base}/${name}`));
    });
  act<Flags>(
    sub('auth-mode', "set a gateway's auth mode").argument('<gw_id>', 'the gateway').argument('<mode>', 'an integer'),
    ctx,
    async (o, [d, gw, mode]) => {
      if (!/^\d+$/.test(mode as string)) throw usageError('<mode> must be an integer');
      const { client, base } = await api(o, d);
      printRecord(
        io,
        o.json,
        await client.put<Record<string, unknown>>(`${base}/gateways/${enc(gw as string)}/auth-mode`, {
          auth_mode: Number(mode),
        }),
      );
    },
  );
  act<Flags>(
    sub('auth', 'authorize a client on a gateway')
      .option('--auth-token <token>', "the client's auth token (--token is the API bearer)")
      .option('--client-ip <ip>', "the client's IP")
      .option('--client-mac <mac>', "the client's MAC")
      .option('--gw-id <id>', 'the gateway')
      .option('--once', 'authorize once'),
    ctx,
    async (o, [d]) => {
      required(o, [
        ['authToken', '--auth-token'],
        ['clientIp', '--client-ip'],
        ['clientMac', '--client-mac'],
        ['gwId', '--gw-id'],
      ]);
      await (await api(o, d)).command({
        type: 'auth',
        token: o.authToken,
        client_ip: o.clientIp,
        client_mac: o.clientMac,
        gw_id: o.gwId,
        once_auth: o.once ?? false,
      });
    },
  );
  act<Flags>(
    sub('kickoff', 'disconnect a client from a gateway')
      .option('--client-ip <ip>', "the client's IP")
      .option('--client-mac <mac>', "the client's MAC")
      .option('--gw-id <id>', 'the gateway'),
    ctx,
    async (o, [d]) => {
      required(o, [
        ['clientIp', '--client-ip'],
        ['clientMac', '--client-mac'],
        ['gwId', '--gw-id'],
      ]);
      await (await api(o, d)).command({
        type: 'kickoff',
        client_ip: o.clientIp,
        client_mac: o.clientMac,
        gw_id: o.gwId,
      });
    },
  );
  act<Flags>(
    sub('tmp-pass', 'let a client through for a while')
      .option('--client-mac <mac>', "the client's MAC")
      .option('--timeout <seconds>', 'how long'),
    ctx,
    async (o, [d]) => {
      required(o, [['clientMac', '--client-mac']]);
      await (await api(o, d)).command({
        type: 'tmp_pass',
        client_mac: o.clientMac,
        ...(o.timeout ? { timeout: Number(o.timeout) } : {}),
      });
    },
  );
  act<Flags>(sub('firmware-info', 'ask the gateway for its firmware information'), ctx, async (o, [d]) => {
    await (await api(o, d)).command({ type: 'get_firmware_info' });
  });
  act<Flags>(
    sub('upgrade', 'tell the gateway to upgrade its firmware')
      .option('--firmware-url <url>', 'http(s)://host[:port]/path, safe characters only')
      .option('--force', 'upgrade even to the same version'),
    ctx,
    async (o, [d]) => {
      required(o, [['firmwareUrl', '--firmware-url']]);
      await (await api(o, d)).command({ type: 'firmware_upgrade', url: o.firmwareUrl, force: o.force ?? false });
    },
  );
  act<Flags>(
    sub('commands', 'commands with their responses and errors').option('--limit <n>', 'how many'),
    ctx,
    async (o, [d]) => {
      const { client, base } = await api(o, d);
      const { items } = await client.get<{ items: Array<Record<string, unknown>> }>(`${base}/commands`, {
        limit: o.limit,
      });
      printRows(io, o.json, items, [
        { header: 'created', value: (c) => c.created_at },
        { header: 'type', value: (c) => c.type },
        { header: 'status', value: (c) => c.status },
        { header: 'error', value: (c) => c.error },
        { header: 'response', value: (c) => c.response },
        { header: 'id', value: (c) => c.id },
      ]);
    },
  );
}

/** The credential as the operator needs it: what to put into the gateway's configuration, once. */
function printCredential(io: CliIo, credential: Record<string, unknown>): void {
  io.out(`\ncredential issued for ${String(credential.identifier)} (shown once; only its hash is stored)\n`);
  io.out(
    `put this in the gateway's wifidog.conf, then restart wifidog:\n  WSServerPath ${String(credential.ws_path)}\n`,
  );
}
