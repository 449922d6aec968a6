#!/usr/bin/env bash
# One short GPU check for a session that is lent an accelerator (run through the device tool):
# set up the project, build the ~0.85B benchmark parents on that machine, merge them with one
# GPU actor, and print GB/s and the split between reading, maths and writing.
#
#   bash bench/gpu_check.sh     (a few minutes: most of it builds the two 1.9 GB parents)
set -euo pipefail
cd "$(dirname "$0")/.."
# The device machine brings its own CUDA torch, safetensors, transformers and tokenizers (and no
# network): use its python3 with this checkout on the path. The check needs no Ray: it drives
# one MergeActor directly, the same code a GPU actor runs.
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible"; print("GPU:", torch.cuda.get_device_name(0))'
export RAYMERGE_BENCH_CACHE=${RAYMERGE_BENCH_CACHE:-/tmp/raymerge-bench}
read -r A B < <($PY bench/parents.py)
$PY - "$A" "$B" <<'PY'
"""Time pass 1 and pass 2 of one GPU actor, split into read / maths / write."""
import os, sys, tempfile, time

import torch

from raymerge.actors import MergeActor, WriteJob
from raymerge.parents import load_parent
from raymerge.options import MergeOptions
from raymerge.plan import build_plan
from raymerge.shards import ShardFile
from raymerge.slerp import slerp_coefficients

a_dir, b_dir = sys.argv[1:3]
out = tempfile.mkdtemp(prefix="gpu-check-")
options = MergeOptions(a=a_dir, b=b_dir, out=out, t=(0.5,))
a, b = load_parent(a_dir, "A"), load_parent(b_dir, "B")
plan = build_plan(a, b, options, 1)
actor = MergeActor(options.block_bytes, num_threads=os.cpu_count() or 1, use_gpu=True)
assert actor.device.type == "cuda"

# Instrument the actor's three stages; CUDA is synchronised so each stage is timed honestly.
spent = {"read": 0.0, "maths": 0.0, "write": 0.0}
def timed(stage, fn, sync=True):
    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        result = fn(*args, **kw)
        if sync:
            torch.cuda.synchronize()
        spent[stage] += time.perf_counter() - t0
        return result
    return wrapper
actor._rows = timed("read", actor._rows)
import raymerge.actors as actors_module
actors_module.reduce_block = timed("maths", actors_module.reduce_block)
actors_module.combine_block = timed("maths", actors_module.combine_block)
# Writes run on the actor's background thread, from CPU tensors: no device sync there.
ShardFile.write_tensor = timed("write", ShardFile.write_tensor, sync=False)

t0 = time.perf_counter()
stats = actor.reduce(list(plan.tensors))
t1 = time.perf_counter()
coefficients = {s.name: (slerp_coefficients(s.reductions, 0.5),) for s in stats}
total = 0
for i, shard in enumerate(plan.shards):
    path = os.path.join(out, shard.filename)
    tensors = tuple(t for t in plan.tensors if t.shard == i)
    total += actor.write(WriteJob((path,), shard.layout.header, tensors,
                                  {t.name: coefficients[t.name] for t in tensors if t.name in coefficients}))
t2 = time.perf_counter()
read_bytes = sum(t.read_bytes for t in plan.tensors)
print(f"pass 1 (reduce): {t1 - t0:.2f} s, {read_bytes / (t1 - t0) / 1e9:.2f} GB/s read")
print(f"pass 2 (write):  {t2 - t1:.2f} s, {total / (t2 - t1) / 1e9:.2f} GB/s written")
print(f"split: read {spent['read']:.2f} s, maths {spent['maths']:.2f} s (both on the actor's thread), "
      f"write {spent['write']:.2f} s (on the background writer, overlapping them)")
PY
