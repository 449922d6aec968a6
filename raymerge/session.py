"""Ray for one merge: attached to a running cluster, or an embedded local Ray, started early and
stopped fast.

Starting an embedded Ray takes seconds (its GCS, raylet and helper processes), as do the driver's
own imports (torch, transformers) and the reading of the parents' configs and tokenizers. So
``start()`` begins Ray on a background thread and returns at once: Ray starts while the driver
plans, and ``wait()`` joins them. The thread lives until ``stop()``, because a child process that
asks to die with its parent (as Ray's do) dies with the thread that started it. For an embedded
Ray:

- the object store gets 256 MiB (tensor bytes never travel through Ray; only plans and records
  do) instead of 30% of memory, which costs the raylet a second to set up;
- its idle workers import torch while the driver plans (``RAY_preload_python_modules``), so the
  merge actors do not wait for it;
- at the end, the helper processes Ray would stop one by one, each given a second (the autoscaler
  monitor always takes it), are killed together first; then ``ray.shutdown`` stops the rest.

A process already connected to Ray (``ray.init`` called by the user, as the tests do) keeps its
connection: the session neither starts nor stops anything.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading

OBJECT_STORE_BYTES = 256 * 2**20
# Ray's processes that hold no state the merge needs at shutdown: killed together, not waited on one
# by one.
HELPERS = ("monitor", "dashboard", "log_monitor")


class RaySession:
    """One merge's Ray; a context manager (start on enter, stop on exit)."""

    def __init__(self, address: str | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.owns_ray = False  # True while this object holds a Ray connection that stop() must end
        self.embedded = False
        self._ready = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._sigterm = None

    def start(self) -> "RaySession":
        """Begin connecting (or starting Ray) in the background; returns at once."""
        import ray

        if ray.is_initialized():
            self._ready.set()
            return self
        # Ray's core worker installs its own SIGTERM handler, which exits at once (status 15) and
        # leaves the partial shards behind; the caller's handler (the CLI stops cleanly, as on
        # Ctrl-C) is put back once Ray is up.
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.getsignal(signal.SIGTERM)
        self.owns_ray = True
        self.embedded = self.address is None
        # The environment is only ever extended here, on the calling thread, before Ray's: a
        # variable added while the main thread imports torch (whose C++ code calls getenv) races
        # glibc's setenv, which may move the whole environment. Ray's writes then replace values.
        _prepare_environment(self.embedded)
        _import_ray_init_modules()
        self._thread = threading.Thread(target=self._run, name="raymerge-ray", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import ray

        try:
            if self.embedded:
                # "local" starts a new instance even when another `ray start` runs on this machine.
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                         object_store_memory=OBJECT_STORE_BYTES, logging_level="ERROR", log_to_driver=False)
            else:
                # Ray refuses resource arguments when attaching to an existing cluster. Actors never
                # print (errors come back as exceptions), so worker logs are not forwarded.
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
        except BaseException as e:  # raised to the driver by wait()
            self._error = e
        finally:
            self._ready.set()
        self._release.wait()

    def wait(self) -> None:
        """Block until Ray is up; raise what starting it raised."""
        self._ready.wait()
        if self._sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if self._error is not None:
            error, self._error = self._error, None
            self.owns_ray = False
            self._release.set()
            raise error

    def stop(self) -> None:
        """End the merge's Ray: an embedded one is shut down, an attached one disconnected; a
        start under way is waited for first."""
        if not self.owns_ray:
            self._release.set()
            return
        import ray

        self._ready.wait()
        try:
            if self.embedded and ray.is_initialized():
                _kill_helpers()
            ray.shutdown()
        finally:
            self.owns_ray = False
            self._release.set()
            if self._thread is not None:
                self._thread.join()

    def __enter__(self) -> "RaySession":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()


# What ray.init imports on first use (Ray 2.5x; with what these import in turn, some 270 modules:
# aiohttp, grpc, pydantic, opentelemetry...). Imported on the calling thread before Ray's starts,
# in about 0.2 s: two threads importing modules that import each other (the driver's torch and
# transformers share some) may each be handed the other's module half-initialized, and fail.
RAY_INIT_MODULES = (
    "ray._common.usage.usage_lib", "ray._private.runtime_env.uv_runtime_env_hook",
    "ray._private.thirdparty.pynvml", "ray.autoscaler._private.util", "ray.autoscaler.v2.utils",
    "ray.core.generated.instance_manager_pb2", "ray.core.generated.usage_pb2", "ray.dashboard.optional_deps",
)


def _import_ray_init_modules() -> None:
    for name in RAY_INIT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # another Ray version: its thread imports what it needs
            pass


def _prepare_environment(embedded: bool) -> None:
    """Add, on this thread, the variables ``ray.init`` adds to the driver's environment, with the
    values it gives them (Ray 2.5x): the debugger hook, and for a new local Ray no usage
    statistics and token authentication (Ray's own step, which also refreshes its config); for an
    embedded Ray also the raylet's preload, so that its prestarted workers import torch while
    the driver plans."""
    os.environ.setdefault("PYTHONBREAKPOINT", "ray.util.rpdb._driver_set_trace")
    if not embedded:
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_preload_python_modules", "torch")
    try:
        from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default
    except ImportError:  # another Ray: ray.init sets up authentication itself
        return
    # Quiet, as ray.init(logging_level="ERROR") would keep it.
    logger = logging.getLogger(enable_token_auth_by_default.__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        enable_token_auth_by_default()
    finally:
        logger.setLevel(level)


def _kill_helpers() -> None:
    """Kill this embedded Ray's helper processes together (ray.shutdown then skips them)."""
    try:
        from ray._private import worker

        processes = worker._global_node.all_processes
    except Exception:  # noqa: BLE001 - Ray's private API changed: ray.shutdown stops them as usual
        return
    helpers = [info.process for kind in HELPERS for info in processes.get(kind, [])]
    for process in helpers:
        if process.poll() is None:
            process.kill()
    for process in helpers:
        process.wait()
