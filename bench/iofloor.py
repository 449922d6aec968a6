"""The I/O floor of a merge: read both parents' weight files fully, write model-sized files.

    python bench/iofloor.py [--copies N] [--cached | --buffered] OUT_FILE OUT_BYTES PARENT_FILE...

Sequential 16 MiB reads of every parent file, then 16 MiB pwrites of OUT_BYTES bytes into
OUT_FILE (with ``--copies N``: into N files OUT_FILE.0 ... OUT_FILE.N-1, one after the other, as
a sweep writes N models) and one fsync per file, in this one process: what any merge must at
least do. Reads and writes bypass the page cache (``O_DIRECT``: the cheapest way this kernel
moves bytes, and what raymerge's actors use for parents that are not cached and for the pages
they write), except where the file system refuses it; ``--cached`` reads the parents through
the page cache (they are in it: a warm floor), ``--buffered`` reads and writes through it.
"""

from __future__ import annotations

import argparse
import mmap
import os

CHUNK = 16 << 20


def _open(path: str, flags: int, direct: bool) -> int:
    """With O_DIRECT where allowed, else plainly (raymerge.shards.open_direct does the same, but
    importing raymerge would import torch and put its start-up into the floor's time)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError:  # a file system that refuses O_DIRECT (tmpfs)
            pass
    return os.open(path, flags, 0o644)


def io_floor(inputs: list[str], out_paths: list[str], out_bytes: int, chunk: int = CHUNK,
             direct_reads: bool = True, direct_writes: bool = True) -> None:
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    for path in inputs:
        fd = _open(path, os.O_RDONLY, direct_reads)
        try:
            offset = 0
            while (n := os.preadv(fd, [buf], offset)) == chunk:  # a short read is the file's end
                offset += n
        finally:
            os.close(fd)
    data = memoryview(buf)  # real bytes from the parents, not a page of zeros
    for out_path in out_paths:
        # Whole chunks with O_DIRECT (its lengths are page multiples), the last partial one plainly.
        fd = _open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct_writes)
        tail = os.open(out_path, os.O_WRONLY)
        try:
            offset = 0
            while offset < out_bytes:
                n = min(chunk, out_bytes - offset)
                offset += os.pwrite(fd if n == chunk else tail, data[:n], offset)
            os.fsync(tail)
        finally:
            os.close(fd)
            os.close(tail)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--cached", action="store_true", help="read the parents through the page cache")
    p.add_argument("--buffered", action="store_true", help="read and write through the page cache")
    p.add_argument("out_file")
    p.add_argument("out_bytes", type=int)
    p.add_argument("parents", nargs="+")
    args = p.parse_args()
    outs = [args.out_file] if args.copies == 1 else [f"{args.out_file}.{i}" for i in range(args.copies)]
    io_floor(args.parents, outs, args.out_bytes, direct_reads=not (args.cached or args.buffered),
             direct_writes=not args.buffered)
