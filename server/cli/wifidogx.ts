/** WiFiDogX operator commands: `fleethub wifidogx <subcommand>` (the lead adds it to the dispatcher). */
import {
  clientFor,
  helpRequested,
  orgOf,
  orgPath,
  parseCommand,
  printJson,
  printRecord,
  printRows,
  processIo,
  runCommand,
  usageError,
  type CliIo,
} from './client.ts';

const USAGE = `Usage:
  fleethub wifidogx show <device>                         device info, gateways, auth modes, firmware info, recent commands
  fleethub wifidogx approve|revoke <device>               approve a pending gateway (prints its credential, secure policy) / revoke one
  fleethub wifidogx credential <device>                   issue or rotate the gateway's credential (shown once; closes its link)
  fleethub wifidogx release <device>                      close its current link so another claim of its device_id may connect
  fleethub wifidogx auth-mode <device> <gw_id> <mode>     set a gateway's auth mode (integer)
  fleethub wifidogx auth <device> --auth-token T --client-ip IP --client-mac MAC --gw-id G [--once]
  fleethub wifidogx kickoff <device> --client-ip IP --client-mac MAC --gw-id G
  fleethub wifidogx tmp-pass <device> --client-mac MAC [--timeout SECONDS]
  fleethub wifidogx firmware-info <device>
  fleethub wifidogx upgrade <device> --firmware-url URL [--force]  (http(s)://host[:port]/path, safe characters only)
  fleethub wifidogx commands <device> [--limit N]         commands with their responses and errors
Options: --org O --json --url --token  (<device>: id or device_id)`;

const enc = encodeURIComponent;

export async function runWifidogxCommand(argv: string[], io: CliIo = processIo): Promise<number> {
  return runCommand(io, async () => {
    const { values, positionals } = parseCommand(
      argv,
      {
        org: { type: 'string' },
        'auth-token': { type: 'string' },
        'client-ip': { type: 'string' },
        'client-mac': { type: 'string' },
        'gw-id': { type: 'string' },
        once: { type: 'boolean' },
        timeout: { type: 'string' },
        force: { type: 'boolean' },
        limit: { type: 'string' },
        'firmware-url': { type: 'string' },
      },
      USAGE,
    );
    const help = helpRequested(values, USAGE, io);
    if (help !== undefined) return help;
    const [sub, device, ...rest] = positionals;
    if (!sub) throw usageError('name a subcommand', USAGE);
    if (!device) throw usageError('name the device', USAGE);
    const client = clientFor(values, io);
    const base = `${orgPath(await orgOf(client, values, io))}/wifidogx/devices/${enc(device)}`;
    const command = async (body: Record<string, unknown>) =>
      printRecord(io, values.json, await client.post<Record<string, unknown>>(`${base}/commands`, body));
    switch (sub) {
      case 'show':
        return void (values.json
          ? printJson(io, await client.get(base))
          : printRecord(io, false, await client.get<Record<string, unknown>>(base)));
      case 'approve': {
        const { credential, ...device } = await client.post<
          Record<string, unknown> & { credential?: Record<string, unknown> }
        >(`${base}/approve`);
        if (values.json) return void printJson(io, credential ? { ...device, credential } : device);
        printRecord(io, false, device);
        if (credential) printCredential(io, credential);
        return 0;
      }
      case 'credential':
        return void (values.json
          ? printJson(io, await client.post(`${base}/credential`))
          : printCredential(io, await client.post<Record<string, unknown>>(`${base}/credential`)));
      case 'revoke':
      case 'release':
        printRecord(io, values.json, await client.post<Record<string, unknown>>(`${base}/${sub}`));
        return 0;
      case 'auth-mode': {
        const [gw, mode] = rest;
        if (!gw || mode === undefined || !/^\d+$/.test(mode))
          throw usageError('auth-mode needs <gw_id> <integer mode>', USAGE);
        printRecord(
          io,
          values.json,
          await client.put<Record<string, unknown>>(`${base}/gateways/${enc(gw)}/auth-mode`, {
            auth_mode: Number(mode),
          }),
        );
        return 0;
      }
      case 'auth':
        // --token is the API bearer; the client's auth token is --auth-token.
        return void (await command({
          type: 'auth',
          token: values['auth-token'],
          client_ip: values['client-ip'],
          client_mac: values['client-mac'],
          gw_id: values['gw-id'],
          once_auth: values.once ?? false,
        }));
      case 'kickoff':
        return void (await command({
          type: 'kickoff',
          client_ip: values['client-ip'],
          client_mac: values['client-mac'],
          gw_id: values['gw-id'],
        }));
      case 'tmp-pass':
        return void (await command({
          type: 'tmp_pass',
          client_mac: values['client-mac'],
          ...(values.timeout ? { timeout: Number(values.timeout) } : {}),
        }));
      case 'firmware-info':
        return void (await command({ type: 'get_firmware_info' }));
      case 'upgrade':
        return void (await command({
          type: 'firmware_upgrade',
          url: values['firmware-url'],
          force: values.force ?? false,
        }));
      case 'commands': {
        const { items } = await client.get<{ items: Array<Record<string, unknown>> }>(`${base}/commands`, {
          limit: values.limit,
        });
        printRows(io, values.json, items, [
          { header: 'created', value: (c) => c.created_at },
          { header: 'type', value: (c) => c.type },
          { header: 'status', value: (c) => c.status },
          { header: 'error', value: (c) => c.error },
          { header: 'response', value: (c) => c.response },
          { header: 'id', value: (c) => c.id },
        ]);
        return 0;
      }
      default:
        throw usageError(`unknown subcommand ${JSON.stringify(sub)}`, USAGE);
    }
  });
}

/** The credential as the operator needs it: what to put into the gateway's configuration, once. */
function printCredential(io: CliIo, credential: Record<string, unknown>): void {
  io.out(`\ncredential issued for ${String(credential.identifier)} (shown once; only its hash is stored)\n`);
  io.out(
    `put this in the gateway's wifidog.conf, then restart wifidog:\n  WSServerPath ${String(credential.ws_path)}\n`,
  );
}
