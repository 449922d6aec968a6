#!/usr/bin/env bash
# One short GPU check for a machine with NVIDIA GPUs (run through the device tool, or by hand):
# the real driver through an embedded Ray, GPU actors on every GPU, the ~0.85B benchmark parents
# evicted from the page cache before each merge; then the same merge on CPU actors, compared byte
# for byte; then a 3-t sweep scored (--eval) on GPU actors and on CPU actors, whose scores must
# agree (to 1e-3: a GPU's matrix products round differently) and choose the same t; everything it
# wrote is removed at the end.
#
#   bash bench/gpu_check.sh         (a few minutes: most of it builds the two 1.9 GB parents)
#   bash bench/gpu_check.sh --7b    (the 7B-shaped pair: 27 GB of parents, 55 GB of disk in all)
#
# Prints each merge's wall time, GB/s of parent bytes read, raymerge's own phases, the actors'
# split (read, reduce, combine, write; on GPUs also the device's copy, maths and copy-back time
# from CUDA events), and whether the GPU and CPU outputs are identical. Its python3 runs this
# checkout (no install, no network): it needs a CUDA torch, ray, safetensors, transformers,
# tokenizers, click and pyarrow importable there. A machine without ray (as the H200 lent to this
# project's sessions is) can take this checkout's ray release as a wheel unpacked into a folder
# on PYTHONPATH, with jsonschema, referencing, jsonschema-specifications and rpds-py; without
# ray/jars, ray/dashboard/client/build and the libraries under ray/ that a merge does not import
# (rllib, serve, llm, train, data, tune), it is 28 MB as a .tar.xz.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d /tmp/gpu-check-XXXXXX)
export RAYMERGE_BENCH_CACHE=${RAYMERGE_BENCH_CACHE:-$WORK/parents}
trap 'rm -rf "$WORK"' EXIT
$PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible"; print("GPUs:", torch.cuda.device_count(), "x", torch.cuda.get_device_name(0))'
# The CPU's compiled reductions (raymerge/native, if a C compiler is here) against the GPU's torch
# operations, bit for bit, on blocks of every dtype, odd sizes and chunk sizes.
$PY - <<'PY'
import torch
from raymerge.native import library, pair_sums
from raymerge.slerp import PAIRS, chunk_elems, torch_chunk_sums
print("compiled CPU kernel:", "built" if library() else "none (no C compiler here): CPU actors run torch operations")
g, checked, differ = torch.Generator().manual_seed(0), 0, 0
for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
    for shape in ((1,), (3,), (13,), (7, 3), (64, 4096), (11, 5632), (100003,), (32000, 4096)):
        a = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape, generator=g).float())).to(dtype)
        b = torch.randn(shape, generator=g).to(dtype)
        for chunk in {chunk_elems(shape), 1, 3, 8, 4096}:
            cpu = pair_sums([a.reshape(-1), b.reshape(-1)], list(PAIRS), chunk)
            cpu = torch_chunk_sums(a, b, chunk) if cpu is None else cpu
            gpu = torch_chunk_sums(a.cuda(), b.cuda(), chunk).cpu()
            checked += 1
            differ += not torch.equal(cpu.view(torch.int64), gpu.view(torch.int64))
print(f"reductions, CPU vs GPU: {checked} cases, {differ} with any bit different")
PY
read -r A B < <($PY bench/parents.py "$@")
$PY - "$A" "$B" "$WORK" <<'PY'
import glob, os, subprocess, sys, time

a, b, work = sys.argv[1:4]
files = sorted(glob.glob(os.path.join(a, "*.safetensors")) + glob.glob(os.path.join(b, "*.safetensors")))
parent_bytes = sum(map(os.path.getsize, files))


def evict():
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def merge(device):
    out = os.path.join(work, device)
    evict()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", a, b, "-o", out, "-t", "0.5",
                           "--quiet", "--device", device], capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode:
        sys.exit(f"{device} merge failed:\n{proc.stderr}")
    summary = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith(("merged", "time:", "actors:"))]
    print(f"{device}: {wall:.1f} s, {parent_bytes / wall / 1e9:.2f} GB/s of parents read (evicted)")
    for line in summary:
        print(f"  {line}")
    return out


def read_floor():
    """Seconds to read every parent byte once from storage (evicted first), 64 MiB at a time."""
    evict()
    started = time.monotonic()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.monotonic() - started


def scored(device):
    """A 3-t sweep scored on the device's actors (--eval, --keep best): its table, printed."""
    import random
    import pyarrow.parquet as pq

    r = random.Random(0)
    text = os.path.join(work, "heldout.txt")
    with open(text, "w") as f:
        f.write(" ".join(f"w{r.randrange(30000)}" for _ in range(2000)))
    out = os.path.join(work, f"sweep-{device}")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", a, b, "-o", out, "-t", "0.3", "-t", "0.5",
                           "-t", "0.7", "--eval", text, "--context", "256", "--keep", "best", "--quiet",
                           "--device", device], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{device} scored sweep failed:\n{proc.stderr}")
    rows = pq.read_table(os.path.join(out, "sweep.parquet")).to_pylist()
    scores = {f"{r['kind']} {r['name']}": r["bits_per_byte"] for r in rows}
    print(f"scored sweep on {device}: {time.monotonic() - started:.1f} s; "
          + ", ".join(f"{k} {v:.6f}" for k, v in scores.items()))
    return scores


floor = read_floor()
print(f"read floor: {parent_bytes / 1e9:.1f} GB of parents read once in {floor:.1f} s ({parent_bytes / floor / 1e9:.2f} GB/s)")
gpu, cpu = merge("gpu"), merge("cpu")
shards = sorted(f for f in os.listdir(cpu) if f.endswith(".safetensors"))
same = all(subprocess.run(["cmp", "-s", os.path.join(gpu, f), os.path.join(cpu, f)]).returncode == 0 for f in shards)
print(f"GPU output vs CPU output: {len(shards)} shards {'byte-identical' if same else 'DIFFER'}")
on_gpu, on_cpu = scored("gpu"), scored("cpu")
worst = max(abs(on_gpu[k] - on_cpu[k]) / on_cpu[k] for k in on_cpu)
best = [min((k for k in s if k.startswith("child")), key=s.get) for s in (on_gpu, on_cpu)]
print(f"scores GPU vs CPU: largest relative difference {worst:.2e}; best {best[0]} on the GPU, {best[1]} on the CPU")
sys.exit(0 if same and best[0] == best[1] and worst < 1e-3 else 1)
PY
