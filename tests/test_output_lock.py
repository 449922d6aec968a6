"""One merge at a time per output directory: a merge holds OUT (a kernel lock under
OUT/.raymerge) for its whole life, so a second merge into the same OUT is refused in one line
instead of writing over the first's shards; the lock dies with its process, so a merge killed
outright never blocks its `--resume`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from raymerge import cli
from raymerge.verify import verify

ARGS = ["-t", "0.5", "--max-shard-size", "10MB", "--quiet"]
# Small row blocks (never an output byte's difference) stretch the medium parents' merge over
# seconds, longer than the second merge takes to start and be refused; a resume may drop them.
SLOW = ["--workers", "2", "--block-size", "16KiB"]
LOCKED = "is being written by another merge (pid "


def test_two_merges_into_one_output_one_proceeds_and_a_killed_one_resumes(medium_parents, ray_head, tmp_path,
                                                                         capfd):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "raymerge.cli", "merge", *medium_parents, "-o", out, *ARGS, *SLOW,
           "--address", ray_head.address]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        [refused] = [p for p in procs if p.poll() is not None]
        [running] = [p for p in procs if p is not refused]
        err = refused.communicate(timeout=30)[1]
        assert refused.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith(f"raymerge: error: output {os.path.realpath(out)} {LOCKED}"
                                                       f"{running.pid} on host "), err
        assert running.poll() is None, "the first merge goes on"
        # Neither --resume nor --overwrite takes an output another merge is writing.
        for extra in ("--resume", "--overwrite"):
            assert cli.run(["merge", *medium_parents, "-o", out, *ARGS, *SLOW, extra]) == 1
            assert LOCKED in capfd.readouterr().err
        running.send_signal(signal.SIGKILL)
        running.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not os.path.exists(os.path.join(out, "config.json")), "killed mid-merge"
    # Resumed with the default blocks and actor count, which never change an output byte.
    assert cli.run(["merge", *medium_parents, "-o", out, *ARGS, "--resume"]) == 0, capfd.readouterr().err
    assert verify(out) == []
    assert not os.path.exists(os.path.join(out, ".raymerge")), "no lock or state is left behind"


def test_a_refused_merge_leaves_no_lock_and_no_directory(tiny_parents, ray_head, tmp_path, capfd):
    """The lock is taken once the inputs are checked; a refusal after it (here: OUT is not empty,
    or the --eval text is missing) removes what the lock added, and OUT if it made it."""
    a, b = tiny_parents
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    assert cli.run(["merge", a, b, "-o", str(nonempty)]) == 1
    assert "is not empty" in capfd.readouterr().err
    assert sorted(os.listdir(nonempty)) == ["keep.txt"]
    assert cli.run(["merge", a, b, "-o", str(tmp_path / "new"), "-t", "0.2", "-t", "0.8",
                    "--eval", str(tmp_path / "no-such-text.txt")]) == 1
    assert "no such file" in capfd.readouterr().err
    assert not (tmp_path / "new").exists()
