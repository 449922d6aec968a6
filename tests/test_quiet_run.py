"""A run that went well prints raymerge's own lines only: a scored sweep stops its merge actors
to free their CPUs for scoring, and stops them so that nothing is pending on a killed actor (a
call to one is retried by Ray, which prints `(raylet) Task MergeActor.where failed. There are 3
retries remaining ... killed by ray.kill` in the middle of the user's output)."""

from __future__ import annotations

import subprocess
import sys


def _failed_calls(address: str) -> set[str]:
    """Ids of the calls to actors that failed on this cluster so far."""
    from ray.util.state import list_tasks

    return {t.task_id for t in list_tasks(address=address, filters=[("state", "=", "FAILED")], limit=10_000,
                                          raise_on_missing_output=False) if t.type == "ACTOR_TASK"}


def test_a_scored_sweep_prints_no_ray_warning(tiny_parents, ray_head, tmp_path):
    """Whether Ray prints its retry warning depends on timing; that no call went to a killed
    actor (and failed) does not."""
    failed = _failed_calls(ray_head.address)
    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    proc = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", *tiny_parents, "-o", str(tmp_path / "out"),
                           "-t", "0.3", "-t", "0.7", "--eval", str(text), "--address", ray_head.address],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    foreign = [line for line in proc.stderr.splitlines()
               if not line.startswith(("reduce:", "eval:", "write:", "merged ", "  ", "waiting for resources:"))]
    assert foreign == [], proc.stderr
    assert _failed_calls(ray_head.address) == failed, "no call failed, none went to a killed actor"
