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
