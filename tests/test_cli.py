"""The command line's own refusals: one `raymerge: error:` line and exit status 1, like every
other bad input, with a pointer to the command's --help."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "raymerge.cli"]


@pytest.mark.parametrize("args,message", [
    (["merge", "a", "b"], "Missing option '-o' / '--out'."),
    (["merge", "a", "b", "-o", "x", "-t", "abc"], "Invalid value for '-t': 'abc' is not a valid float."),
    (["merge", "a", "b", "-o", "x", "--pad", "bogus"],
     "Invalid value for '--pad': 'bogus' is not one of 'gradient', 'zeros', 'copy', 'mean'."),
    (["merge", "a", "b", "-o", "x", "--dtype", "int8"],
     "Invalid value for '--dtype': 'int8' is not one of 'bfloat16', 'float16', 'float32', 'float64'."),
    (["merge", "a", "b", "-o", "x", "--vocab", "both"],
     "Invalid value for '--vocab': 'both' is not one of 'auto', 'union', 'a', 'b'."),
])
def test_click_refusals_are_one_line_and_exit_1(cli, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = cli(*args)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"raymerge: error: {message} (see 'raymerge {args[0]} --help')"]
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_the_console_entry_exits_with_the_status_and_flushes_its_line(tmp_path):
    """The real exit path, in a process of its own: ``entry`` leaves with os._exit (no Python
    teardown), so the status and the flushed error line are what the shell sees. The refusal
    comes while the embedded Ray is still starting on its thread (no --address), as a user's
    first mistake does. Every other refusal is checked in-process through ``raymerge.cli.run``,
    which ``entry`` wraps."""
    missing = tmp_path / "no-such-parent"
    proc = subprocess.run([*CLI, "merge", str(missing), str(tmp_path / "b"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 1
    assert proc.stderr == f"raymerge: error: parent A: {missing} is not a directory\n", proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_run_shares_the_merge_options(cli):
    proc = cli("run", "--help")
    assert proc.returncode == 0
    for option in ("--report", "--tokenizer-from", "--vocab", "--pad", "--resume", "--quiet"):
        assert option in proc.stdout, option
