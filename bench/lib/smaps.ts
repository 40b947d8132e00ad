import { readFileSync } from 'node:fs';

/**
 * This process's resident memory by kind of mapping, from /proc/self/smaps (Linux): the malloc
 * heap (`[heap]` and anonymous mappings under 1 GiB: glibc's arenas, where OpenSSL allocates, and
 * V8's heap pages), the large anonymous reservations (over 1 GiB of address space: WebAssembly
 * memories such as PGlite's — and jemalloc's extents when it is preloaded), and files (code,
 * mapped data). Bytes.
 */
export function residentByMapping(): { malloc: number; reservations: number; files: number } {
  const out = { malloc: 0, reservations: 0, files: 0 };
  let kind: keyof typeof out = 'files';
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const header = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)\s*(.*)$/.exec(line);
    if (header) {
      const size = Number(BigInt(`0x${header[2]}`) - BigInt(`0x${header[1]}`));
      const inode = header[3];
      const name = header[4] ?? '';
      if (inode !== '0' && name.startsWith('/')) kind = 'files';
      else if (name !== '[heap]' && size >= 1024 ** 3) kind = 'reservations';
      else kind = 'malloc';
      continue;
    }
    if (line.startsWith('Rss:')) out[kind] += Number(line.split(/\s+/)[1]) * 1024;
  }
  return out;
}
