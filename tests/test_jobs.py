"""`ray job submit` through cluster/local-job.sh: a good merge succeeds, a bad one fails, and a
job stopped mid-merge is a failure although `ray job submit` itself exits 0 for it.

The bad merge goes to a head the script starts and stops (on free ports, in a temporary
directory of its own), while the other two go, one after the other, to the session's head
(``--address``, its job API); so one head is started here, not three."""

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

from raymerge import pool
from raynodes import merge_actor_pids
from reference import check_merged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Script:
    """One cluster/local-job.sh run in its own process group (with the head it starts, if any),
    its output read line by line on a thread."""

    def __init__(self, *args: str):
        env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        self.proc = subprocess.Popen(["bash", os.path.join(ROOT, "cluster", "local-job.sh"), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def output(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)

    def job(self) -> tuple[str, str] | None:
        """(job API address, job id) once the script has printed them."""
        m = re.search(r"^local-job: (?:.* )?job API at (\S+), job (\S+)$", self.output(), re.M)
        return m.groups() if m else None

    def finish(self, timeout: float = 400) -> tuple[int, str]:
        """The script's exit status and output; its process group is stopped if it hangs."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"local-job.sh hung:\n{self.output()}")
        time.sleep(0.1)  # the reader thread's last lines
        return self.proc.returncode, self.output()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def bad_job(tiny_parents, tmp_path_factory):
    """local-job.sh with its own head, for a parent that does not exist: started when the module
    starts, read at its end. (OUT, Script)."""
    out = tmp_path_factory.mktemp("jobs") / "bad"
    script = Script(str(out.parent / "no-such-parent"), tiny_parents[1], str(out))
    try:
        yield out, script
    finally:
        script.kill()


def _wait_for(predicate, what: str, timeout: float = 120.0, explain=lambda: ""):
    """Poll until predicate() is truthy. A request the job API (busy on two cores) fails or drops
    counts as not yet."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = predicate()
        except (requests.RequestException, ConnectionError):
            found = None
        if found:
            return found
        time.sleep(0.02)
    pytest.fail(f"no {what} within {timeout:g} s\n{explain()}")


def _status(client, job_id: str):
    """The job's status, or None while its head does not know it yet (the API answers 404)."""
    try:
        return client.get_job_status(job_id)
    except RuntimeError as e:
        if "does not exist" in str(e):
            return None
        raise


def test_a_job_stopped_mid_merge_fails(tiny_parents, ray_head, bad_job, tmp_path):
    """The merge's actor is frozen (SIGSTOP) as soon as it is alive, so the merge cannot finish
    before `ray job stop` lands; local-job.sh must then exit non-zero and say STOPPED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    pool.release_idle()  # merge actors this process kept from an earlier test: ray.kill ends them
    _wait_for(lambda: not merge_actor_pids(ray_head), "the end of earlier merge actors")
    out = tmp_path / "out"
    script = Script("--address", ray_head.job_api, *tiny_parents, str(out), "--workers", "1")
    frozen: list[int] = []
    try:
        # The script names the job before `ray job submit` has created it.
        address, job_id = _wait_for(script.job, "job API line from local-job.sh")
        client = _wait_for(lambda: JobSubmissionClient(address), "job API")
        _wait_for(lambda: _status(client, job_id) == JobStatus.RUNNING, "the job running", explain=script.output)
        # The session's head runs nothing else meanwhile: its merge actors are this job's.
        frozen += _wait_for(lambda: merge_actor_pids(ray_head), "live merge actor", explain=script.output)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        assert client.get_job_status(job_id) == JobStatus.RUNNING
        assert not (out / "config.json").exists(), "the stop must land mid-merge"
        _wait_for(lambda: client.stop_job(job_id), "accepted stop request")
        _wait_for(lambda: client.get_job_status(job_id) == JobStatus.STOPPED, "STOPPED status", timeout=60)
        returncode, output = script.finish(timeout=60)
    finally:
        for pid in frozen:  # let them die as Ray ends them
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        script.kill()
    assert returncode != 0, output
    assert f"local-job: job {job_id} STOPPED (ray job submit exited 0)" in output, output
    assert not (out / "config.json").exists()


def test_ray_job_submit_good_merge_succeeds(tiny_parents, ray_head, bad_job, tmp_path):
    out = tmp_path / "out"
    script = Script("--address", ray_head.job_api, *tiny_parents, str(out), "-t", "0.25", "--workers", "2")
    try:
        returncode, output = script.finish()
    finally:
        script.kill()
    assert returncode == 0, output
    assert "SUCCEEDED" in output
    check_merged(str(out), *tiny_parents, t=0.25)


def test_ray_job_submit_bad_merge_fails(bad_job):
    """Through the whole script: its own head started, the job failed, the head stopped."""
    out, script = bad_job
    returncode, output = script.finish()
    assert returncode != 0
    assert re.search(r"^local-job: Ray head on 127\.0\.0\.1:\d+, job API at ", output, re.M), output
    assert "is not a directory" in output
    assert "FAILED" in output
    assert not out.exists()
