"""raymerge with parents and child in an S3 bucket against the same merge on local disk.

    .venv/bin/python bench/objectstore.py [--reps 3] [--layers 8]

Two bf16 Llamas (hidden 512, vocab 32000, ``--layers`` layers: ~116 MB each at 8) built once in
the bench cache, and copied into a bucket of a local S3 server (moto, in-memory, on 127.0.0.1).
Against one Ray head (2 CPUs, started here), side by side, round-robin, ``--reps`` times each:

- local: ``raymerge merge A B -o OUT`` with A, B and OUT on local disk (parents in page cache);
- s3: ``raymerge merge s3://bench/a s3://bench/b -o s3://bench/child-N``: ranged GETs, multipart
  uploads, through the standard AWS variables (AWS_ENDPOINT_URL...).

Both use ``--workers 2 --max-shard-size 50MB`` (several shards, so both actors write). Every s3
child is checked byte for byte against the local one (all files but raymerge.json and
README.md). The local S3 server is a Python process on the same 2 CPUs, so the ratio is what
the protocol costs on this machine, not what a cloud bucket costs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

from buckets import S3Server, s3_env  # noqa: E402
from parents import CACHE  # noqa: E402
from raynodes import RayNode  # noqa: E402

RAYMERGE = os.path.join(os.path.dirname(sys.executable), "raymerge")
ARGS = ["-t", "0.5", "--workers", "2", "--max-shard-size", "50MB", "--quiet"]
PROVENANCE = {"raymerge.json", "README.md"}


def parents(layers: int) -> tuple[str, str]:
    from raymerge.synthetic import build_parent, llama_config

    root = os.path.join(CACHE, f"llama-objectstore-{layers}")
    cfg = llama_config(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=8)
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    if not os.path.exists(os.path.join(root, "done")):
        build_parent(a, cfg, seed=41)
        build_parent(b, cfg, seed=42, base=(cfg, 41))
        open(os.path.join(root, "done"), "w").close()
    return a, b


def upload(endpoint: str, local: str, key: str) -> None:
    from pyarrow import fs as pafs

    env = s3_env(endpoint)
    fs = pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                           region=env["AWS_REGION"], scheme="http", endpoint_override=endpoint.removeprefix("http://"))
    for name in os.listdir(local):
        with open(os.path.join(local, name), "rb") as f, fs.open_output_stream(f"{key}/{name}") as out:
            out.write(f.read())


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return time.monotonic() - start


def same_as_local(env: dict[str, str], uri: str, local: str) -> bool:
    check = ("import sys, os; from raymerge import storage; u, d = sys.argv[1:3]; "
             "sys.exit(any(storage.read_bytes(storage.join(u, n)) != open(os.path.join(d, n), 'rb').read() "
             f"for n in os.listdir(d) if n not in {sorted(PROVENANCE)!r}))")
    return subprocess.run([sys.executable, "-c", check, uri, local], env=env).returncode == 0


def objectstore_section(reps: int, layers: int = 8, env: dict[str, str] | None = None) -> list[str]:
    """Markdown lines of the section: the table, and what it measured. ``env``: the runs'
    environment (bench.py points PYTHONPATH at its frozen copy of raymerge)."""
    a, b = parents(layers)
    size = sum(os.path.getsize(os.path.join(a, f)) for f in os.listdir(a) if f.endswith(".safetensors"))
    work = tempfile.mkdtemp(prefix="raymerge-bench-s3-", dir="/tmp")
    token = os.path.join(work, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "AWS_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)  # as bench.py's head
    server = S3Server(os.path.join(work, "moto.log"))
    head = None
    local, bucket = "local disk", "s3 bucket (local moto server)"
    times: dict[str, list[float]] = {local: [], bucket: []}
    try:
        server.wait_ready()
        server.create_bucket("bench")
        upload(server.endpoint, a, "bench/a")
        upload(server.endpoint, b, "bench/b")
        head = RayNode(os.path.join(work, "head.log"), num_cpus=2, env=env)
        head.wait_ready(timeout=120)
        s3 = {**env, **s3_env(server.endpoint)}
        for rep in range(reps):
            runs = [(local, [RAYMERGE, "merge", a, b, "-o", os.path.join(work, f"local-{rep}")], env),
                    (bucket, [RAYMERGE, "merge", "s3://bench/a", "s3://bench/b", "-o", f"s3://bench/child-{rep}"], s3)]
            for name, argv, run_env in runs[rep % 2:] + runs[:rep % 2]:
                times[name].append(timed([*argv, "--address", head.address, *ARGS], run_env))
                print(f"objectstore rep {rep + 1}/{reps}  {name:32s} {times[name][-1]:6.1f} s", flush=True)
        identical = all(same_as_local(s3, f"s3://bench/child-{rep}", os.path.join(work, "local-0"))
                        for rep in range(reps))
    finally:
        if head is not None:
            head.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times[local])
    rows = [f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f} / {max(ts):.1f} | "
            f"{statistics.median(ts) / base:.2f}× |" for name, ts in times.items()]
    return ["## Parents and child in a bucket", "",
            f"Two bf16 Llamas of {size / 1e6:.0f} MB each ({layers} layers, hidden 512, vocab 32000), merged with "
            f"`merge {' '.join(ARGS)}` on a warm Ray head (2 CPUs): on local disk (parents in page cache), and "
            "with parents and child as `s3://` URIs on a local S3 server (moto, in-memory, a Python process on "
            f"the same 2 CPUs, which spends ~70 ms per request). {reps} reps, round-robin; medians. Every s3 child "
            f"byte-identical to the local one: {'yes' if identical else 'NO'}.", "",
            "| parents and child | median wall s | min / max s | × local disk |", "|---|---|---|---|", *rows, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    print("\n".join(objectstore_section(args.reps, args.layers)))


if __name__ == "__main__":
    main()
