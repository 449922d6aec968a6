"""Merges back to back in one process that keeps its Ray (a Python session, this test suite)
reuse the merge actors instead of starting new ones (about two seconds each: a Ray worker
importing torch); a reused actor forgets the last merge, so a parent rewritten in place is read
anew; kept actors go by themselves soon after."""

from __future__ import annotations

import json
import os
import shutil
import time

from safetensors.torch import load_file, save_file

import raymerge
from raymerge import pool
from reference import check_merged


def _writers(out: str) -> set[int]:
    with open(os.path.join(out, "raymerge.json")) as f:
        return {shard["writer"]["pid"] for shard in json.load(f)["shards"].values()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_back_to_back_merges_reuse_actors_that_read_parents_anew(tiny_parents, ray_head, tmp_path, monkeypatch):
    # A wider window than the product's 3 s, so that a busy machine's pause between the two
    # merges cannot turn reuse into a new start.
    monkeypatch.setattr(pool, "IDLE_S", 8.0)
    a, b = tiny_parents
    b2 = str(tmp_path / "b")
    shutil.copytree(b, b2)
    options = dict(t=0.5, workers=2, max_shard_size="100KB")
    raymerge.merge(a, b2, str(tmp_path / "first"), **options)
    # The same path, the same layout, other values: an actor holding the old file open would
    # read the old bytes.
    weights = os.path.join(b2, "model.safetensors")
    tensors = {name: -t if t.is_floating_point() else t for name, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    # The first merge's actors wait under the wide window; the second's are let go 0.5 s after it.
    monkeypatch.setattr(pool, "IDLE_S", 0.5)
    raymerge.merge(a, b2, str(tmp_path / "second"), **options)
    first, second = _writers(str(tmp_path / "first")), _writers(str(tmp_path / "second"))
    assert len(first) == 2 and second == first, "the second merge's shards were written by the first's actors"
    check_merged(str(tmp_path / "second"), a, b2, t=0.5)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in first) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in first), "kept actors stop once nothing has used them for IDLE_S"
