"""The search's space (anchors per filter -> a mergekit schedule, constants first) and its
held-out split (dev pieces and a test part that partition the text). Pure; no Ray."""

from __future__ import annotations

import random

import pytest

from raymerge.errors import InputError
from raymerge.holdout import DEV_PIECES, split_text, split_windows
from raymerge.schedule import Schedule, evaluate, position
from raymerge.search_space import SEEDED_T, SearchSpace

NAMES = [f"model.layers.{i}.{m}.weight" for i in range(8) for m in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm")]
NAMES += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def test_default_space_is_three_gradients_of_five_anchors():
    space = SearchSpace()
    assert len(space.names()) == 15
    assert space.names()[:5] == tuple(f"self_attn.{i}" for i in range(5))
    assert space.names()[-1] == "default.4"


def test_a_point_is_mergekits_filtered_gradient():
    space = SearchSpace()
    rng = random.Random(0)
    point = {n: rng.random() for n in space.names()}
    schedule = space.schedule(point)
    for name in NAMES:
        group = "self_attn" if "self_attn" in name else "mlp" if "mlp" in name else "default"
        anchors = tuple(point[f"{group}.{i}"] for i in range(5))
        assert schedule.t_for(name, 8) == evaluate(anchors, position(name, 8)), name


def test_constant_points_are_the_global_t_and_come_first_in_order():
    space = SearchSpace(("self_attn",), anchors=3)
    seeded = space.seeded()
    assert [p["default.0"] for p in seeded] == list(SEEDED_T) == [i / 10 for i in range(11)]
    for t, point in zip(SEEDED_T, seeded):
        assert all(space.schedule(point).t_for(n, 8) == t for n in NAMES)


@pytest.mark.parametrize("kwargs, message", [
    ({"anchors": 0}, "--anchors 0: a gradient needs at least one anchor"),
    ({"filters": ("mlp", "mlp")}, "--filter: each filter once"),
    ({"filters": ("default",)}, "not 'default'"),
    ({"filters": ("",)}, "a filter is a non-empty substring"),
])
def test_bad_spaces_are_refused_in_one_line(kwargs, message):
    with pytest.raises(InputError, match=message):
        SearchSpace(**kwargs)


def test_a_filter_asked_for_that_matches_no_tensor_is_refused():
    assert SearchSpace(("self_attn", "mlp"), given=True).for_tensors(NAMES).filters == ("self_attn", "mlp")
    with pytest.raises(InputError, match="--filter 'attention' matches no tensor"):
        SearchSpace(("mlp", "attention"), given=True).for_tensors(NAMES)


@pytest.mark.parametrize("names, kept", [
    (NAMES, ("self_attn", "mlp")),  # Llama, Mistral, Qwen2, Gemma, Phi
    ([n.replace("mlp.up_proj", "block_sparse_moe.experts.0.w1") for n in NAMES], ("self_attn",)),  # Mixtral
    ([f"model.decoder.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "fc1")], ("self_attn",)),  # OPT
    ([f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")], ("mlp",)),  # GPT-2
    (["embed.weight", "head.weight"], ()),
])
def test_default_filters_keep_those_the_architecture_has(names, kept):
    space = SearchSpace().for_tensors(names)
    assert space.filters == kept
    assert space.names() == tuple(f"{g}.{i}" for g in (*kept, "default") for i in range(5))


def test_a_point_outside_zero_one_is_refused():
    space = SearchSpace(("mlp",), anchors=1)
    with pytest.raises(InputError, match=r"t=1.2 \(mlp.0\)"):
        space.schedule({"mlp.0": 1.2, "default.0": 0.5})
    assert space.schedule({"mlp.0": 1, "default.0": 0}) == Schedule(default=(0.0,), filters=(("mlp", (1.0,)),))


@pytest.mark.parametrize("seed", range(20))
def test_dev_pieces_and_test_partition_the_text(seed):
    rng = random.Random(seed)
    text = " ".join("".join(rng.choice("abcdé✓") for _ in range(rng.randrange(1, 9))) for _ in range(rng.randrange(1, 300)))
    holdout = rng.choice([0.1, 0.3, 0.5, 0.9])
    split = split_text(text, holdout, pieces=rng.randrange(1, 6))
    assert "".join(split.dev) + split.test == text
    assert all(split.dev)
    # The cut falls on whitespace (or the end), never inside a word.
    assert split.test == "" or split.test[0].isspace()


@pytest.mark.parametrize("holdout", [0, 1, -0.1, 1.5])
def test_holdout_outside_zero_one_is_refused(holdout):
    with pytest.raises(InputError, match=f"--holdout {holdout}: the held-out fraction must be between 0 and 1"):
        split_text("a b c", holdout)


class Chars:
    """One token per character, BOS 0."""
    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_windows_per_piece_add_up_to_the_texts_bytes():
    text = " ".join(f"word{i}✓" for i in range(200))
    w = split_windows(Chars(), text, context=33, holdout=0.3)
    assert len(w.dev) == DEV_PIECES
    assert sum(x.n_bytes for x in w.dev) + w.test.n_bytes == len(text.encode("utf-8"))
    assert sum(x.n_tokens for x in w.dev) + w.test.n_tokens == len(text)
    assert w.dev_windows == sum(len(x.ids) for x in w.dev)


def test_a_short_text_gets_fewer_dev_pieces_then_is_refused():
    text = "x " * 40  # 80 characters: 56 dev, 24 test
    w = split_windows(Chars(), text, context=21, holdout=0.3)
    assert 1 <= len(w.dev) < DEV_PIECES
    with pytest.raises(InputError, match="too short for one dev and one test window of 41 tokens"):
        split_windows(Chars(), text, context=41, holdout=0.3)
