"""The cost of the two ways to never keep a torn shard after a crash (issue: reliability).

1. fsync-before-rename (what raymerge does): each shard is fsynced before it gets its final name.
2. verify-on-resume (the alternative): write without fsync, and on --resume reread every kept
   shard and check it (here: hash it, as a checksum comparison would).

Both are measured on one model-sized file (parent A's bytes), written the way actors write.

    .venv/bin/python bench/durability_cost.py
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time

from parents import bench_parents

CHUNK = 16 * 2**20


def write(path: str, source: list[str], sync: bool) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    offset = 0
    for src in source:
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
    if sync:
        os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def reread(path: str) -> float:
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return time.perf_counter() - t0


def main(reps: int = 3) -> None:
    a, _ = bench_parents()
    source = sorted(os.path.join(a, f) for f in os.listdir(a) if f.endswith(".safetensors"))
    size = sum(os.path.getsize(s) for s in source)
    synced, unsynced, verified = [], [], []
    with tempfile.TemporaryDirectory(dir=os.path.expanduser("~/.cache")) as tmp:
        path = os.path.join(tmp, "shard.safetensors")
        for _ in range(reps):
            # Settle before each timed write, so that none pays for an earlier one's writeback.
            os.sync()
            unsynced.append(write(path, source, sync=False))
            os.sync()
            synced.append(write(path, source, sync=True))
            os.sync()
            verified.append(reread(path))
    ws, wu, v = (statistics.median(x) for x in (synced, unsynced, verified))
    print(f"{size / 1e9:.2f} GB, medians of {reps}:")
    print(f"  write + fsync         {ws:6.2f} s   (fsync adds {ws - wu:5.2f} s per merge)")
    print(f"  write, no fsync       {wu:6.2f} s")
    print(f"  reread + sha256       {v:6.2f} s   (what verify-on-resume adds to every resume, and it")
    print("                                  cannot tell a torn shard from a good one without a")
    print("                                  checksum written before the crash)")


if __name__ == "__main__":
    main()
