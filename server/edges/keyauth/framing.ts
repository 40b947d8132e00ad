/**
 * Newline-delimited JSON framing, pure: bytes in, complete lines out. A line longer than
 * `maxLineBytes` (without its newline) is refused before it is buffered whole, so a client that
 * never sends a newline cannot grow the buffer without bound.
 */

export class LineTooLongError extends Error {
  constructor(readonly limit: number) {
    super(`a message line is longer than ${limit} bytes; send one JSON object per line, each under ${limit} bytes`);
    this.name = 'LineTooLongError';
  }
}

export class LineReader {
  readonly #max: number;
  #parts: Buffer[] = [];
  #pending = 0;

  constructor(maxLineBytes: number) {
    this.#max = maxLineBytes;
  }

  /** Bytes of the line still waiting for its newline. */
  get pendingBytes(): number {
    return this.#pending;
  }

  /** Feeds a chunk; returns the complete lines it finished (without `\n` or a trailing `\r`). */
  push(chunk: Buffer): string[] {
    const lines: string[] = [];
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl === -1) break;
      const piece = chunk.subarray(start, nl);
      if (this.#pending + piece.length > this.#max) throw new LineTooLongError(this.#max);
      const line = this.#parts.length ? Buffer.concat([...this.#parts, piece]) : piece;
      this.#parts = [];
      this.#pending = 0;
      const text = line.toString('utf8').replace(/\r$/, '');
      if (text.trim() !== '') lines.push(text);
      start = nl + 1;
    }
    const rest = chunk.subarray(start);
    if (rest.length) {
      if (this.#pending + rest.length > this.#max) throw new LineTooLongError(this.#max);
      // Copy: the socket may reuse its buffer.
      this.#parts.push(Buffer.from(rest));
      this.#pending += rest.length;
    }
    return lines;
  }
}

/** One JSON line (the protocol's framing). */
export function encodeLine(message: unknown): string {
  return `${JSON.stringify(message)}\n`;
}
