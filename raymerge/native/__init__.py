"""The compiled fixed-order reductions (fixed_sums.c), built on first use with the C compiler.

``pair_sums`` gives the same float64 bits as slerp.py's torch code (the same products and
additions in the same order, never a fused multiply-add), in one pass over each chunk instead of
a dozen tensor operations. Where no C compiler is found, ``RAYMERGE_NATIVE=0`` is set, the inputs
are not contiguous CPU tensors of a supported dtype (bfloat16, float32, float64), or the build
fails, it returns None and the caller runs the torch code: the output never depends on which ran.

The library is built (``-O3 -march=native``, about 0.4 s) once per kind of CPU into
``$XDG_CACHE_HOME/raymerge`` (else ``~/.cache/raymerge``, else the temporary directory), named by a
hash of the source, the compiler, the flags and the CPU's instruction-set flags, and renamed into
place whole, so actors building it at once never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixed_sums.c")
# -ffp-contract=off: a*b + c stays two roundings, as in torch; no -ffast-math (no reassociation).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
DTYPES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2}

_lock = threading.Lock()
_lib: list = []  # [] untried, [None] unavailable, [lib] loaded


def _cache_dir() -> str:
    for root in (os.environ.get("XDG_CACHE_HOME"), os.path.join(os.path.expanduser("~"), ".cache"),
                 tempfile.gettempdir()):
        if not root:
            continue
        path = os.path.join(root, "raymerge")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    return tempfile.mkdtemp(prefix="raymerge-native-")


def _cpu() -> str:
    """This CPU's architecture and instruction-set flags: a cache shared by unlike nodes (a home
    on NFS) keeps one library per kind of CPU, since -march=native builds for this one."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags.strip()}"


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join((compiler, *FLAGS, _cpu())).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"fixed_sums-{digest}.so")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, "-o", tmp, SOURCE], capture_output=True, timeout=120)
            if done.returncode != 0:
                return None
            os.replace(tmp, path)  # whole, or not at all
        except (OSError, subprocess.TimeoutExpired):
            return None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    lib = ctypes.CDLL(path)
    fn = lib.raymerge_pair_sums
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                   ctypes.POINTER(ctypes.c_int32), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, building it the first time; None where it cannot be had."""
    if not _lib:
        with _lock:
            if not _lib:
                lib = None
                if os.environ.get("RAYMERGE_NATIVE", "1") != "0":
                    try:
                        lib = _build()
                    except OSError:
                        lib = None
                _lib.append(lib)
    return _lib[0]


def pair_sums(inputs: list[torch.Tensor], pairs: list[tuple[int, int]], chunk: int) -> torch.Tensor | None:
    """``[sum of inputs[i] * inputs[j] per chunk for (i, j) in pairs]``: float64, shape
    ``(len(pairs), chunks)``, bit-identical to slerp.py's torch code; None when it cannot run here
    (see the module)."""
    first = inputs[0]
    dtype = DTYPES.get(first.dtype)
    if (dtype is None or first.device.type != "cpu" or first.numel() == 0
            or any(x.dtype != first.dtype or x.device != first.device or x.numel() != first.numel()
                   or not x.is_contiguous() for x in inputs)):
        return None
    lib = library()
    if lib is None:
        return None
    n = first.numel()
    chunks = -(-n // chunk)
    out = torch.empty((len(pairs), chunks), dtype=torch.float64)
    scratch = torch.empty((len(pairs), max(1, chunk // 2)), dtype=torch.float64)
    # Only a chunk whose size is not a multiple of 8 is widened first (fixed_sums.c).
    odd = chunk % 8 or (n % chunk) % 8
    widened = torch.empty((len(inputs), chunk) if odd else (1,), dtype=torch.float64)
    pointers = (ctypes.c_void_p * len(inputs))(*[x.data_ptr() for x in inputs])
    flat = (ctypes.c_int32 * (2 * len(pairs)))(*[k for pair in pairs for k in pair])
    rc = lib.raymerge_pair_sums(pointers, len(inputs), dtype, n, chunk, flat, len(pairs), out.data_ptr(),
                                scratch.data_ptr(), widened.data_ptr())
    if rc != 0:
        raise ValueError(f"fixed_sums: bad arguments (n={n}, chunk={chunk})")
    return out
