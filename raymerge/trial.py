"""One trial of `raymerge search`: a schedule's child, built in memory by a scorer (an EvalActor
living in the trial's process, which the search keeps for trial after trial) from the parents'
bytes and the reductions of pass 1 (no pass over the parents of its own), scored piece by piece
on the dev text, then on the test text.

After each dev piece the trial hands its running dev bits per byte to ``report``; when ``report``
returns False (an early-stopping scheduler gave up on the schedule) the trial ends there, without
its test score. The child is kept only for the trial.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymerge.holdout import SplitWindows
from raymerge.passes import coefficients
from raymerge.plan import MergePlan
from raymerge.schedule import Schedule


@dataclass(frozen=True)
class TrialScore:
    """A trial's result: bits and bytes of what it scored (bits per byte = bits / bytes)."""

    dev_bits: float
    dev_bytes: int
    dev_windows: int
    test_bits: float | None  # None when stopped early
    test_bytes: int
    stopped_early: bool
    build_seconds: float
    score_seconds: float

    @property
    def dev_bits_per_byte(self) -> float:
        return self.dev_bits / self.dev_bytes

    @property
    def test_bits_per_byte(self) -> float | None:
        return None if self.test_bits is None else self.test_bits / self.test_bytes


def schedule_coefficients(plan: MergePlan, stats: dict, schedule: Schedule) -> dict:
    """Every SLERP tensor's coefficients under ``schedule`` (one t each), from pass 1's reductions:
    exactly what a merge under that schedule computes."""
    t_by_name = {t.name: (schedule.t_for(t.name, plan.n_layers),) for t in plan.tensors if t.op == "slerp"}
    return {name: c[0] for name, c in coefficients(stats, t_by_name).items()}


def run_trial(scorer, key: str, plan: MergePlan, coefs: dict, means: dict, config: dict, windows: SplitWindows,
              report=lambda dev_bits_per_byte, dev_windows, test_bits_per_byte: True) -> TrialScore:
    """Build the child on ``scorer`` (an EvalActor, in this process) under ``key``, score it as
    the module says, and drop it. ``report`` is called after each dev piece; after the last one,
    with the test score too (else None)."""
    build_s = scorer.build_child(key, plan, coefs, means, config)
    dev_bits, dev_bytes, dev_windows, score_s, stopped, test_bits = 0.0, 0, 0, 0.0, False, None
    try:
        for i, piece in enumerate(windows.dev):
            result, seconds = scorer.score_built(key, piece)
            dev_bits, dev_bytes, dev_windows = dev_bits + result.bits, dev_bytes + result.n_bytes, dev_windows + result.windows
            score_s += seconds
            if i == len(windows.dev) - 1:
                result, seconds = scorer.score_built(key, windows.test)
                test_bits, score_s = result.bits, score_s + seconds
            if not report(dev_bits / dev_bytes, dev_windows,
                          None if test_bits is None else test_bits / windows.test.n_bytes) and test_bits is None:
                stopped = True
                break
    finally:
        scorer.drop_child(key)
    return TrialScore(dev_bits, dev_bytes, dev_windows, test_bits, windows.test.n_bytes, stopped, build_s, score_s)
