"""A search trial (raymerge/trial.py) on a scorer in this process: its dev and test
scores equal those of the same schedule's child written by a plain `raymerge run` of the
schedule's recipe and scored here with plain transformers; a trial told to stop scores fewer dev
windows and no test."""

from __future__ import annotations

import random

import pytest

from raymerge.actors import MergeActor
from raymerge.evaluation import EvalActor, prepare
from raymerge.holdout import split_text, split_windows
from raymerge.options import MergeOptions
from raymerge.parents import load_parent
from raymerge.plan import build_plan
from raymerge.recipe import load_recipe, write_recipe
from raymerge.search_space import SearchSpace
from raymerge.trial import run_trial, schedule_coefficients
from reference import plain_bits

CONTEXT = 32
HOLDOUT = 0.3


@pytest.fixture(scope="module")
def setup(tiny_parents, session_dir):
    a_path, b_path = tiny_parents
    rng = random.Random(1)
    text_path = session_dir / "search-text.txt"
    text_path.write_text(" ".join(f"w{rng.randrange(900)}" for _ in range(600)) + "\n")
    options = MergeOptions(a=a_path, b=b_path, out="unused", eval_text=str(text_path), context=CONTEXT)
    a, b = load_parent(a_path, "A"), load_parent(b_path, "B")
    plan = build_plan((a, b), options, 1)
    inputs = prepare(options.scoring, a, b, plan)
    tokenizer = (a if plan.tokenizer_from == "a" else b).tokenizer
    text = text_path.read_text()
    windows = split_windows(tokenizer, text, CONTEXT, HOLDOUT)
    # Pass 1's reductions, here from an actor driven in this process.
    stats = {s.name: s for s in MergeActor(2**20).reduce(list(plan.tensors))}
    means = {n: s.means for n, s in stats.items() if s.means}
    return dict(a=a_path, b=b_path, plan=plan, stats=stats, means=means, config=inputs.child_config,
                windows=windows, text=text, scorer=EvalActor(2**20, 1))


def test_two_trials_score_as_their_written_children(setup, cli, tmp_path):
    space = SearchSpace()
    rng = random.Random(7)
    points = {"sampled": {n: rng.random() for n in space.names()}, "constant": space.constant(0.3)}
    pieces = split_text(setup["text"], HOLDOUT, len(setup["windows"].dev))
    for label, point in points.items():
        schedule = space.schedule(point)
        coefs = schedule_coefficients(setup["plan"], setup["stats"], schedule)
        reported = []
        got = run_trial(setup["scorer"], label, setup["plan"], coefs, setup["means"], setup["config"],
                        setup["windows"], report=lambda *values: reported.append(values) or True)
        # The same schedule, written by a plain `raymerge run` of its recipe.
        recipe = tmp_path / f"{label}.yml"
        recipe.write_text(write_recipe(setup["a"], setup["b"], schedule))
        assert load_recipe(str(recipe)).schedule == schedule
        out = tmp_path / label
        assert cli("run", recipe, "-o", out, "--quiet").returncode == 0
        dev_bits = sum(plain_bits(str(out), piece, CONTEXT) for piece in pieces.dev)
        assert got.dev_bits == pytest.approx(dev_bits, rel=1e-9, abs=1e-9), label
        assert got.test_bits == pytest.approx(plain_bits(str(out), pieces.test, CONTEXT), rel=1e-9, abs=1e-9), label
        assert got.dev_bytes == len("".join(pieces.dev).encode()) and got.test_bytes == len(pieces.test.encode())
        assert not got.stopped_early and got.dev_windows == setup["windows"].dev_windows
        assert len(reported) == len(pieces.dev)
        assert reported[-1] == (got.dev_bits_per_byte, got.dev_windows, got.test_bits_per_byte)
        assert all(test is None for _, _, test in reported[:-1])


def test_a_trial_told_to_stop_scores_fewer_dev_windows_and_no_test(setup):
    assert len(setup["windows"].dev) > 1, "the text gives several dev pieces"
    schedule = SearchSpace().schedule(SearchSpace().constant(0.6))
    coefs = schedule_coefficients(setup["plan"], setup["stats"], schedule)
    got = run_trial(setup["scorer"], "stopped", setup["plan"], coefs, setup["means"], setup["config"],
                    setup["windows"], report=lambda *values: False)
    assert got.stopped_early and got.test_bits is None and got.test_bits_per_byte is None
    assert got.dev_windows == len(setup["windows"].dev[0].ids) < setup["windows"].dev_windows
