"""Hub ids through an offline Hugging Face cache, PyTorch .bin parents, a hostile pickle, the
model card, and the Python API against the CLI."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import raymerge

CLI = [sys.executable, "-m", "raymerge.cli"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def same_shards(x: str, y: str) -> None:
    names = sorted(f for f in os.listdir(x) if f.endswith((".safetensors", ".index.json")))
    assert names and names == sorted(f for f in os.listdir(y) if f.endswith((".safetensors", ".index.json")))
    for n in names:
        assert filecmp.cmp(os.path.join(x, n), os.path.join(y, n), shallow=False), n


@pytest.fixture(scope="module")
def plain_merge(tiny_parents, ray_head, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eco") / "plain")
    raymerge.merge(*tiny_parents, out, t=0.4)
    return out


def _hub_cache(root, repo: str, source: str) -> None:
    """Lay a model out as huggingface_hub's cache does: blobs, a snapshot, refs/main."""
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for name in os.listdir(source):
        blob = repo_dir / "blobs" / f"blob-{name}"
        shutil.copyfile(os.path.join(source, name), blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)


def test_hub_ids_from_an_offline_cache(tiny_parents, ray_head, plain_merge, tmp_path):
    hf_home = tmp_path / "hf"
    _hub_cache(hf_home, "raymerge-test/tiny-a", tiny_parents[0])
    _hub_cache(hf_home, "raymerge-test/tiny-b", tiny_parents[1])
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "merge", "raymerge-test/tiny-a", f"raymerge-test/tiny-b@{COMMIT}", "-o", str(out),
                           "-t", "0.4", "--address", ray_head.address, "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    same_shards(str(out), plain_merge)
    with open(out / "raymerge.json") as f:
        prov = json.load(f)["parents"]
    assert prov["a"]["source"] == "raymerge-test/tiny-a" and prov["b"]["revision"] == COMMIT
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.base_model == ["raymerge-test/tiny-a", "raymerge-test/tiny-b"]
    missing = subprocess.run([*CLI, "merge", "raymerge-test/not-cached", "raymerge-test/tiny-b", "-o",
                              str(tmp_path / "o2"), "--address", ray_head.address], capture_output=True, text=True,
                             timeout=300, env=env)
    lines = missing.stderr.splitlines()
    assert missing.returncode == 1 and len(lines) == 1 and lines[0].startswith("raymerge: error: "), missing.stderr
    assert "raymerge-test/not-cached is not a local directory" in lines[0], missing.stderr


def _bin_twin(src: str, dst: str, shards: int) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model*.safetensors*"))
    state = load_file(os.path.join(src, "model.safetensors"))
    if shards == 1:
        torch.save(state, os.path.join(dst, "pytorch_model.bin"))
        return dst
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, os.path.join(dst, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_parents_merge_like_their_safetensors_twins(tiny_parents, ray_head, plain_merge, tmp_path, shards):
    a = _bin_twin(tiny_parents[0], str(tmp_path / "a"), shards)
    b = _bin_twin(tiny_parents[1], str(tmp_path / "b"), shards)
    out = str(tmp_path / "out")
    raymerge.merge(a, b, out, t=0.4)
    same_shards(out, plain_merge)


class _Hostile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_runs_nothing(tiny_parents, cli, tmp_path):
    marker = tmp_path / "pwned"
    a = str(tmp_path / "evil")
    shutil.copytree(tiny_parents[0], a, ignore=shutil.ignore_patterns("model*.safetensors*"))
    # torch.save writes the zip format a real checkpoint has, with the hostile object in data.pkl.
    torch.save({"model.embed_tokens.weight": _Hostile(str(marker))}, os.path.join(a, "pytorch_model.bin"))
    assert not marker.exists()
    proc = cli("merge", a, tiny_parents[1], "-o", tmp_path / "out")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("raymerge: error: "), proc.stderr
    assert "not a loadable PyTorch checkpoint" in lines[0] and "UnpicklingError" in lines[0], proc.stderr
    assert not marker.exists(), "the pickle ran code"


def _provenance(out: str) -> dict:
    with open(os.path.join(out, "raymerge.json")) as f:
        return json.load(f)


def test_model_card_and_provenance(tiny_parents, ray_head, plain_merge, tmp_path):
    """raymerge.json against the runs that wrote it: parents (paths, weight file sizes), t,
    options, version, and a plan fingerprint equal for an identical run and not for another."""
    from importlib.metadata import version

    from huggingface_hub import ModelCard

    a, b = tiny_parents
    card = ModelCard.load(os.path.join(plain_merge, "README.md"))
    assert card.data.base_model == [os.path.realpath(p) for p in tiny_parents]
    assert card.data.library_name == "transformers"
    assert {"merge", "raymerge"} <= set(card.data.tags)
    assert f"raymerge merge {os.path.realpath(a)} {os.path.realpath(b)} -o OUT -t 0.4" in card.text

    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    raymerge.merge(a, b, same, t=0.4)
    raymerge.merge(a, b, other, t=0.25, dtype="float32", pad="zeros", max_shard_size="100KB", block_bytes=65536)
    prov, prov_same, prov_other = _provenance(plain_merge), _provenance(same), _provenance(other)

    def parent(path):
        sizes = {f: os.stat(os.path.join(path, f)).st_size for f in os.listdir(path) if f.endswith(".safetensors")}
        assert sizes == {"model.safetensors": sizes["model.safetensors"]} and sizes["model.safetensors"] > 2 * 276032
        return {"source": path, "path": os.path.realpath(path), "revision": None, "files": sizes}

    for p in (prov, prov_same, prov_other):
        assert p["raymerge_version"] == raymerge.__version__ == version("raymerge")
        assert p["method"] == "slerp" and p["schedule"] is None and p["notes"] == []
        assert p["parents"] == {"a": parent(a), "b": parent(b)}
        assert re.fullmatch(r"[0-9a-f]{64}", p["plan_fingerprint"]), p["plan_fingerprint"]
    assert prov["t"] == 0.4 and prov_other["t"] == 0.25
    assert prov["options"] == {"dtype": "bfloat16", "pad": "gradient", "vocab": "by id",
                               "max_shard_size": 5_000_000_000, "tokenizer_from": "a", "sweep": [0.4]}
    assert prov_other["options"] == {"dtype": "float32", "pad": "zeros", "vocab": "by id",
                                     "max_shard_size": 100_000, "tokenizer_from": "a", "sweep": [0.25]}
    # Each shard's record: its size and CRC-32 (the same in an identical run) and the one process
    # that wrote it (another process in another run).
    shards = {f: os.path.getsize(os.path.join(plain_merge, f)) for f in os.listdir(plain_merge) if f.endswith(".safetensors")}
    for p in (prov, prov_same):
        assert {f: r["size"] for f, r in p["shards"].items()} == shards
        assert all(set(r["writer"]) == {"host", "pid", "node"} for r in p["shards"].values())
    writers = [{f: r.pop("writer") for f, r in p["shards"].items()} for p in (prov, prov_same)]
    assert writers[0] != writers[1]
    assert prov_same == prov, "an identical run records the same provenance, fingerprint included"
    assert prov_other["plan_fingerprint"] != prov["plan_fingerprint"]


def test_python_api_and_cli_give_identical_shards(tiny_parents, cli, plain_merge, tmp_path):
    proc = cli("merge", *tiny_parents, "-o", tmp_path / "cli", "-t", "0.4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    same_shards(str(tmp_path / "cli"), plain_merge)


def test_per_tensor_report(tiny_parents, cli, tmp_path):
    import pyarrow.parquet as pq

    report = tmp_path / "out" / "report.parquet"
    raymerge.merge(*tiny_parents, str(tmp_path / "out"), t=0.4, report=str(report))
    rows = {r["name"]: r for r in pq.read_table(report).to_pylist()}
    assert len(rows) == 39
    q = rows["model.layers.1.self_attn.q_proj.weight"]
    assert 0 < q["angle_deg"] < 90 and q["linear_fallback"] is False and q["t"] == [0.4]
    w = load_file(os.path.join(tiny_parents[0], "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    assert q["norm_a"] == pytest.approx(float(w.double().norm()), rel=1e-12)
    proc = cli("report", report)
    assert proc.returncode == 0, proc.stderr
    assert "layer 3" in proc.stdout and "linear fallbacks: 0" in proc.stdout and "padded tensors: 0" in proc.stdout
