"""cluster/local-job.sh against a real head on 127.0.0.1: a job stopped mid-merge is a failure,
although `ray job submit` itself exits 0 for it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_for(predicate, what: str, timeout: float = 120.0):
    """Poll until predicate() is truthy. A request the head (busy on two cores) fails or drops
    counts as not yet."""
    import requests
    from ray.util.state.exception import RayStateApiException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = predicate()
        except (RayStateApiException, requests.RequestException, ConnectionError):
            found = None
        if found:
            return found
        time.sleep(0.02)
    pytest.fail(f"no {what} within {timeout:g} s")


def _merge_actors(address: str) -> list[int]:
    from ray.util.state import list_actors

    alive = list_actors(address=address, filters=[("class_name", "=", "MergeActor"), ("state", "=", "ALIVE")],
                        detail=True)
    return [a.pid for a in alive]


def test_a_job_stopped_mid_merge_fails(tiny_parents, tmp_path):
    """The merge's actors are frozen (SIGSTOP) as soon as they are alive, so the merge cannot finish
    before `ray job stop` lands; local-job.sh (its own head, our session's token) must then exit
    non-zero and say STOPPED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "cluster", "local-job.sh"), *tiny_parents, str(out),
                             "--workers", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def job_line():
        while not lines.empty():
            seen.append(lines.get())
            m = re.match(r"local-job: .* job API at (\S+), job (\S+)$", seen[-1])
            if m:
                return m.groups()
        return None

    frozen: list[int] = []
    try:
        address, job_id = _wait_for(job_line, "job API line from local-job.sh")
        frozen += _wait_for(lambda: _merge_actors(address), "live merge actor")
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        client = _wait_for(lambda: JobSubmissionClient(address), "job API")
        assert client.get_job_status(job_id) == JobStatus.RUNNING
        assert not (out / "config.json").exists(), "the stop must land mid-merge"
        _wait_for(lambda: client.stop_job(job_id), "accepted stop request")
        _wait_for(lambda: client.get_job_status(job_id) == JobStatus.STOPPED, "STOPPED status", timeout=60)
        returncode = proc.wait(timeout=60)
    finally:
        for pid in frozen:  # let them die as Ray ends them
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:  # local-job.sh hung: stop its process group (its head is in it)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    assert returncode != 0, output
    assert f"local-job: job {job_id} STOPPED (ray job submit exited 0)" in output, output
    assert not (out / "config.json").exists()
