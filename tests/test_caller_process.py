"""What raymerge leaves alone in the process that calls it: the environment is only extended on
the calling thread (never from Ray's start-up thread while the main thread imports torch), and
the memory allocator is tuned only in Ray's own worker processes. Each check runs in a fresh
Python, since both are process-wide and sticky."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _python(code: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_ray_starts_on_its_thread_without_adding_variables_or_importing_modules():
    """Ray starts on a thread while the driver imports torch and transformers. glibc's setenv may
    move the environment while another thread's getenv reads it, and two threads importing
    modules that import each other may each get the other's half-initialized: so every variable
    an embedded Ray adds, and every module ray.init imports, is added or imported before its
    thread starts (Ray's own writes then only replace values; its probes for accelerators that
    are not installed import nothing)."""
    added, imported = _python("""
        import os, sys, threading

        added, imported = [], []

        def hook(event, args):
            if threading.current_thread() is threading.main_thread():
                return
            if event == "os.putenv" and os.fsdecode(args[0]) not in os.environ:
                added.append(os.fsdecode(args[0]))
            if event == "import":
                imported.append(args[0])

        sys.addaudithook(hook)
        os.environ.pop("RAY_ADDRESS", None)
        from raymerge.session import RaySession

        session = RaySession().start()
        import torch, transformers  # what the driver imports while Ray starts
        session.wait()
        session.stop()
        print(added, "|", sorted(name for name in set(imported) if name in sys.modules))
    """).split(" | ")
    assert added == "[]", f"added from Ray's thread: {added}"
    assert imported == "[]", f"imported on Ray's thread: {imported}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_merge_actor_made_in_the_callers_process_leaves_its_allocator_alone():
    """Ray's merge actors keep freed block buffers for reuse (mallopt); a MergeActor built in a
    caller's own process (a script, a test, the GPU check) must not change that process's
    allocator. Seen from outside: a 64 MiB allocation is served by its own mmap, as glibc does by
    default, before and after."""
    out = _python("""
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                       "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.mallinfo2.restype = MallInfo2

        def mmapped_allocation() -> bool:
            before = libc.mallinfo2().hblks
            p = libc.malloc(64 * 2**20)
            mapped = libc.mallinfo2().hblks > before
            libc.free(p)
            return mapped

        first = mmapped_allocation()
        from raymerge.actors import MergeActor

        MergeActor(2**20)
        after_library = mmapped_allocation()
        MergeActor(2**20, owns_process=True)  # as Ray's worker runs it
        print(first, after_library, mmapped_allocation())
    """)
    assert out == "True True False"
