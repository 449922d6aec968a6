"""The I/O floor of a merge: read both parents' weight files fully, write one model-sized file.

    python bench/iofloor.py OUT_FILE OUT_BYTES PARENT_FILE...

Sequential 16 MiB reads of every parent file, then 16 MiB pwrites of OUT_BYTES bytes into
OUT_FILE and one fsync at the end, in this one process: what any merge must at least do.
"""

from __future__ import annotations

import os
import sys

CHUNK = 16 << 20


def io_floor(inputs: list[str], out_path: str, out_bytes: int, chunk: int = CHUNK) -> None:
    buf = bytearray(chunk)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    data = memoryview(buf)  # real bytes from the parents, not a page of zeros
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < out_bytes:
            offset += os.pwrite(fd, data[:min(chunk, out_bytes - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    io_floor(sys.argv[3:], sys.argv[1], int(sys.argv[2]))
