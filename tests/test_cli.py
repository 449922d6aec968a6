"""The command line's own refusals: one `raymerge: error:` line and exit status 1, like every
other bad input, with a pointer to the command's --help."""

from __future__ import annotations

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
def test_click_refusals_are_one_line_and_exit_1(args, message, tmp_path):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"raymerge: error: {message} (see 'raymerge {args[0]} --help')"]
    assert proc.stdout == ""


def test_run_shares_the_merge_options():
    proc = subprocess.run([*CLI, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for option in ("--report", "--tokenizer-from", "--vocab", "--pad", "--resume", "--quiet"):
        assert option in proc.stdout, option
