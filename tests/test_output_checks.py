"""An output the actors cannot write is refused before any tensor is read, and said as what it is."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "raymerge.cli"]


@pytest.fixture
def read_only_fs(tmp_path):
    """A read-only tmpfs (mounting needs root, as CI and the dev machines have)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_read_only_output_is_refused_before_pass_one(tiny_parents, ray_head, read_only_fs):
    a, b = tiny_parents
    out = read_only_fs / "deeper" / "out"  # OUT does not exist yet: its nearest existing parent is probed
    proc = subprocess.run([*CLI, "merge", a, b, "-o", str(out), "--address", ray_head.address],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith(f"cannot write into {read_only_fs}: Read-only file system")
    assert "reduce:" not in proc.stderr, "no tensor was read"


def test_every_file_is_durable_before_config_json(tiny_parents, ray_head, tmp_path, monkeypatch):
    import os

    import raymerge

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    a, b = tiny_parents
    out = os.path.realpath(tmp_path / "child")
    raymerge.merge(a, b, out, t=0.5, workers=1, max_shard_size="200KB")
    files = sorted(n for n in os.listdir(out) if not n.endswith(".safetensors"))
    assert "tokenizer.json" in files and "model.safetensors.index.json" in files
    # write_atomic syncs config.json under its temporary name, before the rename.
    config = next(i for i, p in enumerate(synced) if p.startswith(os.path.join(out, "config.json")))
    for name in files:
        if name != "config.json":
            assert os.path.join(out, name) in synced[:config], f"{name} is not synced before config.json"
    assert out in synced[:config], "the directory is synced before config.json"
    assert synced[-1] == out, "and after config.json's rename"
