"""End to end on tiny Llama parents over the session's Ray: tensors, loading, determinism, CLI."""

from __future__ import annotations

import filecmp
import json
import os
import re

import pytest
import torch

import raymerge
from reference import check_merged



def _shards(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


@pytest.fixture(scope="module")
def merged(tiny_parents, ray_head, tmp_path_factory):
    a, b = tiny_parents
    out = str(tmp_path_factory.mktemp("merge") / "child")
    result = raymerge.merge(a, b, out, t=0.3, workers=2, max_shard_size="100KB")
    return out, result


def test_every_tensor_matches_the_reference(merged, tiny_parents):
    out, result = merged
    check_merged(out, *tiny_parents, t=0.3)
    assert result.actors == 2
    # 4 layers of q 64x64, k and v 32x64, o 64x64, gate/up/down 128x64 and two norms of 64 (36992
    # values each), embedding and head 1000x64, final norm 64: 276032 bfloat16 values.
    assert (result.tensors, result.bytes_written) == (39, 2 * 276032)
    assert len(_shards(out)) > 1, "a small --max-shard-size must give several shards"
    assert not os.path.exists(os.path.join(out, ".raymerge")), "no working state is left behind"


def test_child_loads_with_transformers_and_gives_finite_logits(merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = merged
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 1000 and torch.isfinite(logits).all()
    assert model.dtype == torch.bfloat16


def test_child_files(merged, tiny_parents):
    out, _ = merged
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "raymerge.json", "model.safetensors.index.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == 1000
    with open(os.path.join(out, "raymerge.json")) as f:
        prov = json.load(f)
    assert prov["t"] == 0.3 and prov["parents"]["a"]["path"] == os.path.realpath(tiny_parents[0])


def test_second_run_is_byte_identical(merged, tiny_parents, tmp_path):
    out, _ = merged
    again = str(tmp_path / "again")
    raymerge.merge(*tiny_parents, again, t=0.3, workers=1, max_shard_size="100KB")
    names = _shards(out)
    assert names == _shards(again)
    assert all(filecmp.cmp(os.path.join(out, n), os.path.join(again, n), shallow=False) for n in names)
    assert filecmp.cmp(os.path.join(out, "model.safetensors.index.json"),
                       os.path.join(again, "model.safetensors.index.json"), shallow=False)


def test_cli_merges_into_a_single_shard(tiny_parents, cli, tmp_path):
    out = tmp_path / "cli"
    proc = cli("merge", *tiny_parents, "-o", out, "-t", "0.7", "--workers", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert _shards(out) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    check_merged(str(out), *tiny_parents, t=0.7)
    # The whole summary, line by line: counts (one shard has one writer: one actor of the two
    # asked for), the output, and every phase of the time line by name and in order.
    seconds = r"(\d+\.\d) s"
    summary = re.fullmatch(
        rf"merged 39 tensors with 1 actors on 1 node\(s\) in {seconds} \(0\.00 GB written\)\n"
        rf"  t=0\.7: {re.escape(os.path.realpath(out))}\n"
        rf"  time: plan {seconds}, start Ray {seconds}, start actors {seconds}, merge {seconds}, "
        rf"stop Ray {seconds}, assemble {seconds}\n"
        rf"  actors: read {seconds}, reduce {seconds}, combine {seconds}, write {seconds} \(summed over 1 actors\)\n",
        proc.stderr)
    assert summary, proc.stderr
    total, plan, start_ray, start_actors, merge, stop_ray, assemble = map(float, summary.groups()[:7])
    # The phases tile the merge's wall time: together they are its total (each line rounds to
    # 0.1 s), so none is left out or counted twice.
    assert abs((plan + start_ray + start_actors + merge + stop_ray + assemble) - total) <= 0.35 + 1e-9, summary.groups()
