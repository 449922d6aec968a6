"""A failing write pass: the real error surfaces, no descriptor leaks, nothing is synced."""

from __future__ import annotations

import gc
import os

import pytest

from raymerge.actors import MergeActor, WriteJob
from raymerge.options import MergeOptions
from raymerge.parents import load_parent
from raymerge.plan import build_plan
from raymerge.slerp import Coefficients
from raynodes import open_files


def _job(parents, tmp_path, paths):
    a, b = parents
    plan = build_plan((load_parent(a, "A"), load_parent(b, "B")), MergeOptions(a=a, b=b, out=str(tmp_path)), 1)
    coefs = {t.name: (Coefficients(0.5, 0.5, True, 0.0),) * len(paths) for t in plan.shard_tensors(0)
             if t.op == "slerp"}
    return WriteJob.for_shard(plan, 0, tuple(paths), reduced=True, coefficients=coefs)


def _open_fds(*roots) -> list[str]:
    """The files under ``roots`` (the parents', the output's) this process holds open; other
    descriptors come and go with the session's Ray and its threads."""
    return sorted(open_files("self", *(os.path.realpath(r) for r in roots)))


def test_a_shard_that_cannot_be_opened_leaks_no_descriptor(tiny_parents, tmp_path):
    job = _job(tiny_parents, tmp_path, [str(tmp_path / "ok.safetensors"), str(tmp_path / "missing" / "x.safetensors")])
    actor = MergeActor(2**20)
    before = _open_fds(*tiny_parents, tmp_path)
    with pytest.raises(FileNotFoundError):
        actor.write(job)
    assert _open_fds(*tiny_parents, tmp_path) == before


def test_a_failure_is_not_hidden_by_a_sync(tiny_parents, tmp_path, monkeypatch):
    job = _job(tiny_parents, tmp_path, [str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")])
    actor = MergeActor(2**20)
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or (_ for _ in ()).throw(OSError(5, "sync failed")))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", "/somewhere/shard")

    monkeypatch.setattr(actor, "_out_blocks", broken)
    before = _open_fds(*tiny_parents, tmp_path)
    with pytest.raises(OSError) as info:
        actor.write(job)
    assert info.value.errno == 28, "the real error, not the sync's"
    assert synced == [], "a failing pass syncs nothing"
    # The exception's frames still hold views of the parents' mapped pages (and so the mappings'
    # descriptors); once it is gone, nothing may remain open.
    del info
    gc.collect()
    assert _open_fds(*tiny_parents, tmp_path) == before
