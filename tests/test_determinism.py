"""Byte-identical output whatever the number of actors (and so of torch threads per actor) and
whatever the block size."""

from __future__ import annotations

import os

import pytest

import raymerge
from raymerge.actors import MergeActor
from raymerge.options import MergeOptions
from raymerge.parents import load_parent
from raymerge.plan import build_plan
from raymerge.slerp import reduce_tensor
from raymerge.synthetic import build_parent, llama_config


@pytest.fixture(scope="module")
def float32_parents(session_dir):
    """float32 parents with 1 MiB tensors: a float64 dot over them splits across threads."""
    config = llama_config(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, dtype="float32")
    root = session_dir / "float32"
    a = build_parent(str(root / "a"), config, seed=1, tokenizer=False)
    b = build_parent(str(root / "b"), config, seed=2, base=(config, 1), tokenizer=False)
    return a, b


def test_reductions_do_not_depend_on_the_actor_thread_count(float32_parents, tmp_path):
    a, b = float32_parents
    plan = build_plan((load_parent(a, "A"), load_parent(b, "B")), MergeOptions(a=a, b=b, out=str(tmp_path)), 1)
    results = [{s.name: s.reductions for s in MergeActor(2**20, num_threads=n).reduce(list(plan.tensors))}
               for n in (1, 2, 3)]
    assert results[0] == results[1] == results[2]


@pytest.fixture(scope="module")
def written(float32_parents, ray_head, tmp_path_factory):
    """``written(workers, block_bytes)``: the shards and index of the merge at t=0.37 in shards of
    2 MB, each merge done once for the tests below."""
    a, b = float32_parents
    root = tmp_path_factory.mktemp("determinism")
    done = {}

    def get(workers: int, block: int) -> dict[str, bytes]:
        if (workers, block) not in done:
            out = str(root / f"w{workers}-b{block}")
            raymerge.merge(a, b, out, t=0.37, workers=workers, block_bytes=block, max_shard_size="2MB")
            done[workers, block] = {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))
                                    if n.endswith(".safetensors") or n.endswith(".index.json")}
        return done[workers, block]

    return get


def test_one_two_and_three_actors_write_the_same_bytes(written):
    # On the session's 1-CPU head: one CPU, then a fraction of one each (thread counts: test_slerp).
    outputs = [written(workers, 2**20) for workers in (1, 2, 3)]
    assert len(outputs[0]) > 2, "several shards"
    assert outputs[0] == outputs[1] == outputs[2]


def test_block_sizes_give_the_fixed_order_reductions(float32_parents, tmp_path):
    """Blocks are cut in whole reduction chunks: 64 KiB, 1 MiB and 64 MiB blocks (a GPU actor's
    size) give the bits of the whole tensor reduced at once, as the contract orders it."""
    a, b = float32_parents
    plan = build_plan((load_parent(a, "A"), load_parent(b, "B")), MergeOptions(a=a, b=b, out=str(tmp_path)), 1)
    results = [{s.name: s.reductions for s in MergeActor(block).reduce(list(plan.tensors))}
               for block in (2**16, 2**20, 2**26)]
    assert results[0] == results[1] == results[2]
    whole = MergeActor(2**26)
    for t in plan.tensors:
        if t.op == "slerp":
            rows = whole._sources(t, 0, t.shape[0] if t.shape else 1, {})
            assert reduce_tensor(*rows) == results[0][t.name], t.name


def test_block_size_never_changes_a_byte(written):
    # The 1 MiB merge on two actors is the one the test above made.
    assert written(2, 2**16) == written(2, 2**20)
