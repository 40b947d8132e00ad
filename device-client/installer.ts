import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

/** The firmware a device runs: the uuid it joins `device:<uuid>` with, and its version. */
export interface RunningFirmware {
  uuid: string;
  version: string;
}

/** A downloaded and verified image, ready to install. */
export interface StagedImage {
  path: string;
  uuid: string;
  version: string;
  sha256: string;
  size: number;
}

/**
 * Puts verified images where the next boot finds them. The client downloads into
 * `stagingPath()`, verifies, then calls `install`; after its simulated (or real) reboot it calls
 * `boot()` to learn what runs now. A failed install must leave the running image bootable.
 */
export interface Installer {
  /** What runs now, after applying a pending switch to a newly installed image; null when unknown. */
  boot(): Promise<RunningFirmware | null>;
  /** Records the running firmware when the state directory has none (first start). */
  setRunning(firmware: RunningFirmware): Promise<void>;
  /** Where to download the next image. */
  stagingPath(): Promise<string>;
  /** Installs `image` for the next boot; throws an error whose message an operator can act on. */
  install(image: StagedImage): Promise<void>;
  /** Drops what `install` set up for the next boot (a failed trial boot): the next boot runs the current image. */
  revert(): Promise<void>;
}

export class InstallError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'InstallError';
  }
}

type Slot = 'a' | 'b';

interface SlotState {
  active: Slot;
  slots: Partial<Record<Slot, RunningFirmware & { sha256?: string; size?: number }>>;
}

/**
 * A/B slots as files: `slot-a.img`, `slot-b.img`, `state.json` (what each slot holds, which is
 * active) and a `boot-next` marker naming the slot the next boot switches to. Installing writes
 * only the inactive slot, so the running one always stays bootable.
 */
export class SlotInstaller implements Installer {
  readonly #dir: string;

  constructor(dir: string) {
    this.#dir = path.resolve(dir);
  }

  get dir(): string {
    return this.#dir;
  }

  slotPath(slot: Slot): string {
    return path.join(this.#dir, `slot-${slot}.img`);
  }

  async boot(): Promise<RunningFirmware | null> {
    const state = await this.#read();
    const marker = path.join(this.#dir, 'boot-next');
    if (existsSync(marker)) {
      const next = (await readFile(marker, 'utf8')).trim();
      // A marker naming an empty slot would brick a real device: stay on the active slot.
      if ((next === 'a' || next === 'b') && state.slots[next]) {
        state.active = next;
        await this.#write(state);
      }
      await rm(marker, { force: true });
    }
    return pick(state.slots[state.active]);
  }

  async setRunning(firmware: RunningFirmware): Promise<void> {
    const state = await this.#read();
    state.slots[state.active] = { ...state.slots[state.active], ...firmware };
    await this.#write(state);
  }

  async stagingPath(): Promise<string> {
    await mkdir(this.#dir, { recursive: true });
    return path.join(this.#dir, 'staging.part');
  }

  async install(image: StagedImage): Promise<void> {
    const state = await this.#read();
    const target: Slot = state.active === 'a' ? 'b' : 'a';
    try {
      await fsyncFile(image.path);
      await rename(image.path, this.slotPath(target));
    } catch (err) {
      throw new InstallError(
        `writing slot ${target} in ${this.#dir} failed (${(err as Error).message}); check free space and permissions`,
      );
    }
    state.slots[target] = { uuid: image.uuid, version: image.version, sha256: image.sha256, size: image.size };
    await this.#write(state);
    await writeAtomic(path.join(this.#dir, 'boot-next'), `${target}\n`);
  }

  async revert(): Promise<void> {
    await rm(path.join(this.#dir, 'boot-next'), { force: true });
  }

  async #read(): Promise<SlotState> {
    try {
      return JSON.parse(await readFile(path.join(this.#dir, 'state.json'), 'utf8')) as SlotState;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { active: 'a', slots: {} };
      throw new InstallError(
        `${path.join(this.#dir, 'state.json')} is unreadable (${(err as Error).message}); remove it to start over`,
      );
    }
  }

  async #write(state: SlotState): Promise<void> {
    await mkdir(this.#dir, { recursive: true });
    await writeAtomic(path.join(this.#dir, 'state.json'), `${JSON.stringify(state, null, 2)}\n`);
  }
}

/**
 * Runs a command to install an image on a real device (e.g. `fwup -a -d /dev/mmcblk0 -t upgrade
 * -i "$FLEETHUB_FIRMWARE_FILE"`). Environment: FLEETHUB_FIRMWARE_FILE, _VERSION, _UUID, _SHA256.
 * The running firmware is remembered in `<stateDir>/running.json`; a successful install writes
 * `next.json`, which the next `boot()` promotes.
 */
export class ExecInstaller implements Installer {
  readonly #stateDir: string;
  readonly #command: string;

  constructor(options: { command: string; stateDir: string }) {
    this.#command = options.command;
    this.#stateDir = path.resolve(options.stateDir);
  }

  async boot(): Promise<RunningFirmware | null> {
    const next = path.join(this.#stateDir, 'next.json');
    if (existsSync(next)) await rename(next, path.join(this.#stateDir, 'running.json'));
    try {
      return pick(JSON.parse(await readFile(path.join(this.#stateDir, 'running.json'), 'utf8')) as RunningFirmware);
    } catch {
      return null;
    }
  }

  async setRunning(firmware: RunningFirmware): Promise<void> {
    await mkdir(this.#stateDir, { recursive: true });
    await writeAtomic(path.join(this.#stateDir, 'running.json'), `${JSON.stringify(firmware)}\n`);
  }

  async stagingPath(): Promise<string> {
    await mkdir(this.#stateDir, { recursive: true });
    return path.join(this.#stateDir, 'staging.part');
  }

  async install(image: StagedImage): Promise<void> {
    const env = {
      ...process.env,
      FLEETHUB_FIRMWARE_FILE: image.path,
      FLEETHUB_FIRMWARE_VERSION: image.version,
      FLEETHUB_FIRMWARE_UUID: image.uuid,
      FLEETHUB_FIRMWARE_SHA256: image.sha256,
    };
    const { code, stderr } = await new Promise<{ code: number | null; stderr: string }>((resolve, reject) => {
      const child = spawn('/bin/sh', ['-c', this.#command], { env, stdio: ['ignore', 'inherit', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => {
        stderr = (stderr + d.toString()).slice(-2000);
        process.stderr.write(d);
      });
      child.once('error', reject);
      child.once('close', (c) => resolve({ code: c, stderr }));
    });
    if (code !== 0) {
      const tail = stderr.trim().split('\n').slice(-3).join(' | ');
      throw new InstallError(
        `install command exited with ${code}${tail ? `: ${tail}` : ''}; the running firmware is unchanged`,
      );
    }
    await writeAtomic(
      path.join(this.#stateDir, 'next.json'),
      `${JSON.stringify({ uuid: image.uuid, version: image.version })}\n`,
    );
  }

  async revert(): Promise<void> {
    await rm(path.join(this.#stateDir, 'next.json'), { force: true });
  }
}

function pick(slot: RunningFirmware | undefined): RunningFirmware | null {
  return slot?.uuid && slot.version ? { uuid: slot.uuid, version: slot.version } : null;
}

async function fsyncFile(file: string): Promise<void> {
  const handle = await open(file, 'r+');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Write-then-rename so a power cut leaves the old or the new file, never half of one. */
async function writeAtomic(file: string, content: string): Promise<void> {
  const tmp = `${file}.tmp`;
  await writeFile(tmp, content);
  await fsyncFile(tmp);
  await rename(tmp, file);
}
