"""Run a command and measure its wall time and the peak memory of every process it spawns.

Memory is a process's own: RssAnon + RssShmem from /proc/PID/status. Pages of mmapped parent
files are page cache (RssFile) and are not counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

# The process-tree walk is the one the tests use to stop exactly the Ray processes they start.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from raynodes import descendants  # noqa: E402


def _tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def own_memory_kb(pid: int) -> tuple[str, int] | None:
    """(name, RssAnon + RssShmem in kB) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    kb = sum(int(fields.get(k, "0 kB").split()[0]) for k in ("RssAnon", "RssShmem"))
    return (cmd or fields["Name"].strip())[:80], kb


@dataclass
class Measurement:
    wall_s: float
    returncode: int
    peaks: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (name, peak kB)
    peak_total_kb: int = 0
    stderr: str = ""

    @property
    def peak_process_kb(self) -> int:
        return max((kb for _, kb in self.peaks.values()), default=0)

    def top(self, n: int = 6) -> list[tuple[str, int]]:
        return sorted(self.peaks.values(), key=lambda x: -x[1])[:n]


def measure(cmd: list[str], env: dict | None = None, interval: float = 0.1) -> Measurement:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    result = Measurement(0.0, 0)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            total = 0
            for pid in _tree(proc.pid):
                got = own_memory_kb(pid)
                if got:
                    name, kb = got
                    total += kb
                    if kb > result.peaks.get(pid, ("", -1))[1]:
                        result.peaks[pid] = (name, kb)
            result.peak_total_kb = max(result.peak_total_kb, total)
            time.sleep(interval)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    _, err = proc.communicate()
    result.wall_s = time.monotonic() - started
    stop.set()
    t.join()
    result.returncode = proc.returncode
    result.stderr = err.decode(errors="replace")
    if proc.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
    return result


if __name__ == "__main__":
    m = measure(sys.argv[1:])
    print(f"wall {m.wall_s:.1f} s, rc {m.returncode}, peak process {m.peak_process_kb / 1024:.0f} MiB, "
          f"peak total {m.peak_total_kb / 1024:.0f} MiB")
    for name, kb in m.top(10):
        print(f"  {kb / 1024:8.0f} MiB  {name}")
