"""Measured runs for bench/bench.py: bench/measure.py's wall time, plus memory and CPU accounting
over every process the bench started (a warm merge's actors live under the bench's Ray head,
outside the command's own process tree), and how busy the rest of the machine was meanwhile.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field

from measure import _tree, measure, own_memory_kb

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    wall_s: float
    ok: bool
    peak_process_kb: int
    peak_total_kb: int
    top: list[tuple[str, int]]
    other_cpus: float  # average CPUs busy with processes this bench did not start, during the run
    phases: dict[str, float]  # raymerge's own "time:" line (phase -> seconds); empty for others
    scoring: dict[str, float] = field(default_factory=dict)  # --eval: "build", "score" (summed over actors)


def read_fully(files: list[str]) -> None:
    """Read every file once (untimed), so each contender starts with the parents in page cache."""
    buf = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has been busy (not idle, not iowait) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK


def cpu_s(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_quiet(limit_s: float = 300, threshold: float = 0.3) -> None:
    """Wait (at most limit_s) until the machine is nearly idle, so runs do not share the CPUs."""
    deadline = time.monotonic() + limit_s
    while True:
        before = busy_cpu_s()
        time.sleep(2)
        load = (busy_cpu_s() - before) / 2
        if load < threshold:
            return
        if time.monotonic() > deadline:
            print(f"  (machine still busy: {load:.2f} CPUs used by others; running anyway)", flush=True)
            return


def phases(stderr: str) -> dict[str, float]:
    """The phases of raymerge's summary line ``  time: plan 0.1 s, start Ray 2.3 s, ...``."""
    for line in stderr.splitlines():
        if line.strip().startswith("time: "):
            return {name.strip(): float(s) for name, s in re.findall(r"([a-zA-Z +]+?) ([0-9.]+) s", line.split(":", 1)[1])}
    return {}


def scoring(stderr: str) -> dict[str, float]:
    """``--eval``'s summary line: seconds to build (or load) the models and to score them."""
    m = re.search(r"scoring, summed over actors: .* in ([0-9.]+) s, scored in ([0-9.]+) s", stderr)
    return {"build": float(m.group(1)), "score": float(m.group(2))} if m else {}


def measured(cmd: list[str], env: dict[str, str] | None) -> Run:
    """measure() from bench/measure.py for wall time, plus memory of everything this process started.

    measure() sees only the command's own process tree; a warm merge's actors live under the Ray
    head, which this process started too, so the sampler here walks all of our descendants. It
    also counts our CPU time, to report how busy the rest of the machine was during the run.
    """
    me, peaks, total_peak, stop = os.getpid(), {}, [0], threading.Event()
    cpu_start = {pid: cpu_s(pid) for pid in _tree(me)}
    cpu_last: dict[int, float] = {}

    def sample() -> None:
        while not stop.is_set():
            ours = _tree(me)
            for pid in ours:
                cpu_last[pid] = max(cpu_last.get(pid, 0.0), cpu_s(pid))
            total = 0
            for pid in ours[1:]:
                got = own_memory_kb(pid)
                if got:
                    total += got[1]
                    if got[1] > peaks.get(pid, ("", -1))[1]:
                        peaks[pid] = got
            total_peak[0] = max(total_peak[0], total)
            time.sleep(0.1)

    busy0 = busy_cpu_s()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    m = measure(cmd, env=env)
    stop.set()
    sampler.join()
    cpu_last[me] = cpu_s(me)
    ours = sum(c - cpu_start.get(pid, 0.0) for pid, c in cpu_last.items())
    other = max(0.0, busy_cpu_s() - busy0 - ours) / m.wall_s
    top = sorted(peaks.values(), key=lambda x: -x[1])[:8]
    return Run(m.wall_s, m.returncode == 0, max((kb for _, kb in top), default=0), total_peak[0], top, other,
               phases(m.stderr), scoring(m.stderr))
