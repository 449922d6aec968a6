"""The I/O floor of a merge: read both parents' weight files fully, write model-sized files.

    python bench/iofloor.py [--copies N] OUT_FILE OUT_BYTES PARENT_FILE...

Sequential 16 MiB reads of every parent file, then 16 MiB pwrites of OUT_BYTES bytes into
OUT_FILE (with ``--copies N``: into N files OUT_FILE.0 ... OUT_FILE.N-1, one after the other, as
a sweep writes N models) and one fsync per file, in this one process: what any merge must at
least do.
"""

from __future__ import annotations

import argparse
import os

CHUNK = 16 << 20


def io_floor(inputs: list[str], out_paths: list[str], out_bytes: int, chunk: int = CHUNK) -> None:
    buf = bytearray(chunk)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    data = memoryview(buf)  # real bytes from the parents, not a page of zeros
    for out_path in out_paths:
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            while offset < out_bytes:
                offset += os.pwrite(fd, data[:min(chunk, out_bytes - offset)], offset)
            os.fsync(fd)
        finally:
            os.close(fd)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("out_file")
    p.add_argument("out_bytes", type=int)
    p.add_argument("parents", nargs="+")
    args = p.parse_args()
    outs = [args.out_file] if args.copies == 1 else [f"{args.out_file}.{i}" for i in range(args.copies)]
    io_floor(args.parents, outs, args.out_bytes)
