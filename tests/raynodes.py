"""Ray nodes started by the tests, and stopped by the process ids they started (never by name)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


# Ray's worker processes listen on 10002-19999 (its --min/--max-worker-port defaults).
_FIRST_PORT = 20000
_next_port: int | None = None


def _port_range() -> tuple[int, int]:
    """The ports free_port draws from: above Ray's worker ports and below the kernel's ephemeral
    range, which it hands out to every outgoing connection (and to every bind to port 0)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low, ephemeral_high = map(int, f.read().split())
    except (OSError, ValueError):
        ephemeral_low, ephemeral_high = 32768, 60999  # Linux's default
    if ephemeral_low - _FIRST_PORT >= 1000:
        return _FIRST_PORT, ephemeral_low - 1
    return ephemeral_high + 1, 65535


def free_port() -> int:
    """A port nothing holds now, and that nothing but a test's explicit choice will take.

    A port is chosen some seconds before a Ray node's process binds it. A port of the kernel's
    ephemeral range may meanwhile become the source port of any outgoing connection (seen: a
    head's client server failed to bind its port, and `ray start --block` took the whole head,
    and the test process attached to it, down). So ports come from outside that range, each test
    process (pytest-xdist worker) from its own slice, in turn, never the same one twice in a row.
    """
    global _next_port
    low, high = _port_range()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = (high - low + 1) // max(workers, 1)
    first = low + size * (worker % max(workers, 1))
    if _next_port is None or not first <= _next_port < first + size:
        _next_port = first + os.getpid() % size  # another run's nodes may linger on the slice's start
    for _ in range(size):
        port, _next_port = _next_port, first + (_next_port + 1 - first) % size
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every address: a node binds 127.0.0.1 and this host's own
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {first}-{first + size - 1}")


def _children(pid: int) -> list[int]:
    """The process's children, as the kernel lists them per thread (``/proc/PID/task/TID/children``):
    a few small reads, where scanning every process's stat file costs milliseconds of CPU, which
    a test polling for an actor would take from the merge it watches."""
    children = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return children


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot), or None if it is gone: with the pid, this
    names one process even after the pid is reused (pid_max is 32768 here, and Ray's threads
    use pids up fast)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def state(pid: int) -> str:
    """The process's (or thread's) state letter (T: stopped, Z: a zombie), or X once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def all_stopped(pid: int) -> bool:
    """Every thread of the process is stopped (SIGSTOP takes effect on a thread once its system
    call returns)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return all(state(int(t)) in "Tt" for t in threads)


def freeze(pid: int, still_wanted) -> bool:
    """Stop (SIGSTOP) a process and, once every thread has stopped (a busy machine may take a
    while), keep it so if ``still_wanted()``; otherwise let it go on (SIGCONT). Whether it is
    kept stopped."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 10
    while not all_stopped(pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    if all_stopped(pid) and still_wanted():
        return True
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    return False


def open_files(pid: int | str, *roots: str) -> dict[str, int]:
    """The files under ``roots`` (paths as the process sees them) that process ``pid`` (or
    ``"self"``) holds open, each with the bytes it has so far."""
    prefixes = tuple(root.rstrip("/") + "/" for root in roots)
    held = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return held
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(prefixes):
                held[target] = os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:  # closed meanwhile
            continue
    return held


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in _children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def worker_pids(kind: str, *nodes) -> list[int]:
    """The Ray worker processes of one kind the nodes have spawned: a worker's command line names
    its actor class (``ray::MergeActor``, or ``ray::ImplicitFunc`` for a Tune trial)."""
    pids = []
    for node in nodes:
        for pid in descendants(node.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(f"ray::{kind}".encode()):
                        pids.append(pid)
            except OSError:
                pass
    return pids


def merge_actor_pids(*nodes) -> list[int]:
    """The MergeActor processes the nodes have spawned."""
    return worker_pids("MergeActor", *nodes)


class RayNode:
    """``ray start --block`` in its own session; ``stop()`` kills exactly the processes it spawned."""

    def __init__(self, log_path: str, head: bool = True, address: str | None = None, num_cpus: int = 2,
                 resources: str | None = None, env: dict | None = None, extra_args: list[str] | None = None,
                 autoscaled: dict | None = None, wrap: list[str] | None = None, dashboard: bool = True):
        """``autoscaled``: worker node types (``available_node_types``) for Ray's own autoscaler,
        which then starts them as processes of this machine (its fake multi-node provider).
        ``wrap``: argv put before ``ray start ...``; it must end up exec-ing its arguments, so
        that ``proc`` stays the node (``buckets.py`` mounts a bucket in a namespace so).
        ``dashboard``: a head's dashboard, which `ray job submit` and Ray's state API need; without
        it a head starts faster and idles on less CPU."""
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self.port = free_port()
        env = dict(env or {})
        extra_args = list(extra_args or [])
        if autoscaled is not None:
            config_path = log_path + ".autoscaling.json"
            with open(config_path, "w") as f:
                json.dump(_autoscaling_config(autoscaled, num_cpus, f"127.0.0.1:{self.port}"), f)
            extra_args.append(f"--autoscaling-config={config_path}")
            env.update(AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1")
        # No log monitor (drivers here never take workers' output: log_to_driver=False) and no
        # workers started ahead of need (Ray prestarts one per CPU, which a test's actors may never
        # use): CPU a 2-core machine running two test processes is short of.
        cmd = [ray, "start", "--block", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               "--include-log-monitor=false"]
        env.update(RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0")
        self.temp_dir = None
        if head:
            self.dashboard_port = free_port()
            # A temporary directory of its own (not the shared /tmp/ray): a job's driver finds its
            # head through it, which in /tmp/ray is whichever head on this machine started last.
            self.temp_dir = tempfile.mkdtemp(prefix="raymerge-ray-")
            cmd += ["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                    f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={free_port()}"]
            if not dashboard:
                cmd.append("--include-dashboard=false")
        else:
            cmd += [f"--address={address}", "--node-ip-address=127.0.0.1"]
        # The dashboard agent listens on 52365 unless told otherwise: a second node on this machine
        # would lose its agent (and `ray job submit` its target) to the first.
        cmd.append(f"--dashboard-agent-listen-port={free_port()}")
        if resources:
            cmd.append(f"--resources={resources}")
        cmd += extra_args
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([*(wrap or []), *cmd], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **env})
        self.address = f"127.0.0.1:{self.port}" if head else address
        self._spawned: dict[int, int] = {}  # pid -> its start time

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log.name) as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {tail}")
            self._record()
            with open(self.log.name) as f:
                if "Ray runtime started" in f.read():
                    return
            time.sleep(0.5)
        raise RuntimeError(f"ray start did not come up in {timeout} s: see {self.log.name}")

    def _record(self) -> None:
        for pid in descendants(self.proc.pid):
            started = start_time(pid)
            if started is not None:
                self._spawned[pid] = started

    def stop(self) -> None:
        """SIGKILL the node and every process it was seen to spawn that is still that process."""
        self._record()
        # Our own child cannot be reused before we reap it; the others must still be themselves.
        pids = [self.proc.pid] + [p for p, started in sorted(self._spawned.items()) if start_time(p) == started]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.log.close()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    @property
    def job_api(self) -> str:
        """The head's job API (`ray job submit --address`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"


def _autoscaling_config(worker_types: dict, head_cpus: int, gcs_address: str) -> dict:
    """A cluster launcher config for Ray's fake multi-node provider: the autoscaler "launches" a
    node by starting a raylet with the node type's resources on this machine."""
    types = {name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in worker_types.items()}
    types["ray.head.default"] = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "raymerge-test", "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types, "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }
