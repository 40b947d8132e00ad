import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import type { Command } from 'commander';
import { buildDeviceProgram, main as deviceMain } from '../../device-client/cli.ts';
import type { CliIo } from '../../server/cli/client.ts';
import { walk } from '../../server/cli/command.ts';
import { buildProgram, main } from '../../server/cli/index.ts';
import { captureIo, runCaptured } from '../helpers/cli-io.ts';

const VERSION = (
  JSON.parse(readFileSync(path.resolve(import.meta.dirname, '../../package.json'), 'utf8')) as { version: string }
).version;

const run = (entry: (argv: string[], io: CliIo) => Promise<number>, argv: string[]) => runCaptured(entry, argv);

/** Every command of the tree (the root too), from commander's own model of it. */
function commandsOf(build: (ctx: { io: CliIo; exitCode: number }) => Command) {
  return walk(build({ io: captureIo().io, exitCode: 0 }));
}

for (const [program, entry, build] of [
  ['fleethub', main, buildProgram],
  ['fleethub-device', deviceMain, buildDeviceProgram],
] as const) {
  describe(`${program} --help and --version`, () => {
    const commands = commandsOf(build);

    test('the tree has the commands the README names', () => {
      const names = commands.map((c) => c.path.join(' '));
      const expected =
        program === 'fleethub'
          ? ['serve', 'login', 'logout', 'groups add', 'firmware upload', 'firmware keys add', 'status', 'devices logs']
          : ['connect', 'simulate'];
      for (const name of expected) assert.ok(names.includes(name), `${name} in ${names.join(', ')}`);
    });

    for (const { path: cmdPath, command } of commands) {
      const name = [program, ...cmdPath].join(' ');
      test(`${name} --help exits 0 and mentions each of its flags`, async () => {
        const res = await run(entry, [...cmdPath, '--help']);
        assert.equal(res.code, 0, res.err);
        assert.match(res.out, new RegExp(`^Usage: ${name.replace(/ /g, ' ')}\\b`));
        for (const option of command.options) {
          if (option.hidden) continue;
          assert.ok(res.out.includes(option.long!), `${name} --help mentions ${option.long}`);
        }
        for (const sub of command.commands)
          assert.ok(res.out.includes(sub.name()), `${name} --help lists ${sub.name()}`);
      });
    }

    test(`${program} --version prints the package version`, async () => {
      const res = await run(entry, ['--version']);
      assert.equal(res.code, 0);
      assert.equal(res.out.trim(), VERSION);
    });

    test('an unknown flag is a usage error that names it and suggests the nearest one', async () => {
      const argv =
        program === 'fleethub'
          ? ['devices', 'list', '--stauts', 'online']
          : ['connect', '--url', 'u', '--cert', 'c', '--key', 'k', '--ca', 'a', '--stat-dir', 'd'];
      const res = await run(entry, argv);
      assert.equal(res.code, 2);
      assert.match(res.err, new RegExp(`unknown option '${argv.at(-2)}'`));
      assert.match(res.err, program === 'fleethub' ? /Did you mean --status\?/ : /Did you mean --state-dir\?/);
    });

    test('an unknown command is a usage error with a suggestion, no arguments print the help', async () => {
      const typo = program === 'fleethub' ? 'grups' : 'simualte';
      const res = await run(entry, [typo]);
      assert.equal(res.code, 2);
      assert.match(res.err, /unknown command/);
      assert.match(res.err, /Did you mean/);
      const bare = await run(entry, []);
      assert.equal(bare.code, 2);
      assert.match(bare.err, /^Usage:/);
    });
  });
}

describe('usage errors', () => {
  test('a missing argument or required flag exits 2 and says which', async () => {
    const missing = await run(main, ['groups', 'create', 'beta']);
    assert.equal(missing.code, 2);
    assert.match(missing.err, /required option '--product <product>' not specified/);
    const noArg = await run(main, ['target', 'set', '--group', 'g']);
    assert.equal(noArg.code, 2);
    assert.match(noArg.err, /missing required argument 'firmware'/);
    const both = await run(main, ['target', 'set', '1.0.0']);
    assert.equal(both.code, 2);
    assert.match(both.err, /exactly one of --group or --device/);
  });

  test('an option of a command after the command belongs to it: devices list --version V filters', async () => {
    // --version after a command is that command's option, not the program's.
    const res = await run(main, [
      'devices',
      'list',
      '--version',
      '1.0.0',
      '--url',
      'http://127.0.0.1:9',
      '--token',
      'x',
    ]);
    assert.equal(res.code, 1);
    assert.match(res.err, /cannot reach http:\/\/127\.0\.0\.1:9/);
  });
});
