"""timing.py: where an actor call's time goes, phases nested, on a clock the test drives."""

import time

import torch

from raymerge.actors import MergeActor, WriteJob
from raymerge.options import MergeOptions
from raymerge.parents import load_parent
from raymerge.plan import build_plan
from raymerge.shards import WriteBehind
from raymerge.timing import CallTimer, describe


def test_an_inner_phase_counts_for_itself_only():
    now = [0.0]
    split = CallTimer(torch.device("cpu"), clock=lambda: now[0])
    with split.phase("combine"):
        now[0] += 2.0
        with split.phase("write"):
            now[0] += 3.0
        now[0] += 1.0
        with split.phase("write"):
            now[0] += 0.5
    with split.phase("read"):
        now[0] += 4.0
    with split.gpu("gpu maths"):  # nothing on a CPU actor
        now[0] += 1.0
    assert split.seconds() == {"combine": 3.0, "write": 3.5, "read": 4.0}
    assert describe(split.seconds()) == "read 4.0 s, combine 3.0 s, write 3.5 s"


def test_a_write_call_reports_every_phase(tiny_parents, tmp_path, monkeypatch):
    a, b = tiny_parents
    options = MergeOptions(a=a, b=b, out=str(tmp_path), t=(0.5,))
    plan = build_plan((load_parent(a, "A"), load_parent(b, "B")), options, 1)
    # Every block handed to the background writer waits 5 ms, as it would behind a full queue:
    # inside a combination, that wait is the write phase's alone.
    waits = []
    submit = WriteBehind.submit

    def slow_submit(self, *args):
        time.sleep(0.005)
        waits.append(0.005)
        return submit(self, *args)

    monkeypatch.setattr(WriteBehind, "submit", slow_submit)
    actor = MergeActor(options.block_bytes)
    job = WriteJob.for_shard(plan, 0, (str(tmp_path / plan.shards[0].filename),),
                             ts={t.name: (0.5,) for t in plan.tensors if t.op == "slerp"})
    started = time.perf_counter()
    result = actor.write(job)
    wall = time.perf_counter() - started
    seconds = result.seconds
    assert set(seconds) == {"read", "reduce", "combine", "write"}
    assert all(s > 0 for s in seconds.values()), seconds
    assert seconds["write"] >= sum(waits), (seconds, sum(waits))
    # Phases are counted once each (the waits inside combine are not combine's too): together
    # they fit in the call's own wall time.
    assert sum(seconds.values()) <= wall, (seconds, wall)
