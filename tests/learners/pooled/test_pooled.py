"""The pooled learner (ocl/learners/pooled/learner.py, heldout.py): its prediction against its
experts run side by side, the held-out pool, its options."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from ocl.errors import OCLError
from ocl.learners.checks import check_learner, clusters, prequential
from ocl.learners.common import Temperature
from ocl.learners.linear import LinearLearner
from ocl.learners.ncm import NCMLearner
from ocl.learners.pooled import FixedShare, LogLinearPool, PooledLearner
from ocl.learners.pooled.experts import Calibrated
from ocl.learners.slda import SLDALearner
from ocl.learners.transformer import TransformerLearner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NET = dict(d_model=16, n_layers=2, n_heads=2, window=4, replay_streams=2, lr=1e-2, warmup=0)  # a tiny network
TINY_NET = {"name": "transformer", **NET}


def pooled(experts, **options) -> PooledLearner:
    return PooledLearner(8, 3, seed=0, experts=experts, **options)


@pytest.mark.parametrize("pool", ["fixed_share", "loglinear"])
@pytest.mark.parametrize("experts", [["net", "linear"], ["net", "linear", "slda"], ["net", "slda"], ["linear", "ncm"]],
                         ids=lambda e: "+".join(e))
@pytest.mark.parametrize("C", [1, 3], ids=["C1", "C3"])
def test_the_pool_predicts_its_experts_pooled(C, experts, pool):
    """The learner against its experts run side by side (the same options, the same seed), pooled
    by a pool of the same kind fed the same labels; SLDA through its temperature, fitted on the
    chunks it scored. ``evaluate`` (held-out pool off) pools the experts' evaluations with the
    online weights."""
    x, y = clusters(30)
    make = {"net": lambda: TransformerLearner(8, 3, seed=0, **NET), "linear": lambda: LinearLearner(8, 3, seed=0, lr=1.0),
            "slda": lambda: SLDALearner(8, 3, seed=0), "ncm": lambda: NCMLearner(8, 3, seed=0)}
    learner = pooled([TINY_NET if e == "net" else e for e in experts], pool=pool, heldout_mixture=False)
    alone = [make[e]() for e in experts]
    temperature = Temperature(lr=0.01)  # SLDA's calibration

    def scores(xc: torch.Tensor, method: str) -> torch.Tensor:
        lp = [getattr(e, method)(xc) for e in alone]
        return torch.stack([temperature(p) if name == "slda" else p for name, p in zip(experts, lp)])

    mix = FixedShare(len(alone), share=0.01) if pool == "fixed_share" else LogLinearPool(len(alone))
    for s in range(0, 30, C):
        xc, yc = x[s : s + C], y[s : s + C]
        sc = scores(xc, "predict")
        torch.testing.assert_close(learner.predict(xc), mix.predict(sc), rtol=0, atol=1e-5)
        if "slda" in experts:
            temperature.step(alone[experts.index("slda")].predict(xc), yc)
        for model in (learner, *alone):
            model.update(xc, yc)
        mix.update(sc, yc)
    if "slda" in experts:
        assert temperature.log_scale != 0.0 and isinstance(learner.experts[experts.index("slda")], Calibrated)
    torch.testing.assert_close(learner.evaluate(x), mix.predict(scores(x, "evaluate")), rtol=0, atol=1e-5)


def test_the_default_pool_is_the_network_a_linear_read_out_and_calibrated_slda():
    learner = PooledLearner(8, 3, seed=0)
    assert learner.expert_names == ["transformer", "linear", "slda"] and learner.name == "pooled"
    assert [type(e) for e in learner.experts] == [TransformerLearner, LinearLearner, Calibrated]
    assert isinstance(learner.experts[2].inner, SLDALearner)
    assert isinstance(learner.pool, LogLinearPool) and len(learner.pool.weights) == 3
    assert learner.heldout is not None and learner.heldout.scores == "mixed" and learner.heldout.skip == 64


def test_an_expert_item_takes_options_and_calibrate():
    """A mapping item: ``name`` + options over the shipped config; ``calibrate`` turns the pool's
    temperature on or off whatever the learner's default."""
    learner = pooled([{"name": "transformer", "window": 2, "d_model": 16, "n_heads": 2, "calibrate": True},
                      {"name": "slda", "shrinkage": 0.3, "calibrate": False}])
    net, slda = learner.experts
    assert isinstance(net, Calibrated) and net.inner.cfg.window == 2
    assert isinstance(slda, SLDALearner) and slda.shrinkage == 0.3


@pytest.mark.parametrize("experts,match", [
    ([], "non-empty list"), ("linear", "non-empty list"), (["lineer"], r"experts\[0\]: unknown learner 'lineer'"),
    ([3], r"experts\[0\]=3: must be a learner's name"), ([{"lr": 1.0}], r"experts\[0\].*needs `name`"),
    (["linear", {"name": "linear", "lrr": 1.0}], r"learner.experts\[1\]: unknown option\(s\) \['lrr'\]"),
    ([{"name": "slda", "calibrate": "yes"}], r"experts\[0\].calibrate='yes'"),
    ([{"_target_": "ocl.learners.linear.Nope"}], r"experts\[0\]"),
])
def test_bad_experts_are_refused_with_what_is_wrong(experts, match):
    with pytest.raises(OCLError, match=match):
        pooled(experts)


@pytest.mark.parametrize("bad", [{"share": 1.0}, {"pool": "product"}, {"heldout_scores": "future"},
                                 {"heldout_lag": 0}, {"heldout_skip": -1}])
def test_bad_pool_options_are_refused(bad):
    with pytest.raises(OCLError, match=next(iter(bad))):
        pooled(["linear", "ncm"], **bad)


def test_the_transformer_takes_no_read_out_or_pool_option():
    """``learner=transformer`` is the network alone: the options that pooled it are unknown now."""
    from ocl.build import learner_config, make_learner

    for option in ("linear_expert", "slda_expert", "pool", "heldout_mixture"):
        with pytest.raises(OCLError, match=rf"unknown option\(s\) \['{option}'\]"):
            make_learner(learner_config("transformer", {option: True}), 8, 3, 0)
        with pytest.raises(OCLError, match="unknown transformer learner option"):
            TransformerLearner(8, 3, **{option: True})


def test_a_pool_keeps_the_contract_with_a_plug_in_learner():
    """An expert given by ``_target_`` (any Learner subclass: here NCM named by its class path)."""
    factory = functools.partial(PooledLearner, experts=["linear", {"_target_": "ocl.learners.ncm.NCMLearner"}])
    assert factory(8, 3).expert_names == ["linear", "NCMLearner"]
    check_learner(factory)


def test_heldout_mixture_weighs_experts_by_how_they_score_unseen_examples():
    """``heldout_mixture``: evaluate() pools the experts' held-out predictions with weights of
    their own. On a stream whose labels come in long runs and whose inputs carry no class
    information, the online weights go to whoever follows the runs (the fast linear read-out's
    bias); held out, its lagged copy cannot follow them, so it must lose weight there."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat_interleave(40) % 3  # runs of 40
    x = torch.randn(y.shape[0], 8, generator=g)  # no information about the class
    net = {**TINY_NET, "eval_context": "none", "copy": False}  # (copying labels, the network would follow runs too)
    learner = pooled([net, "linear"], pool="fixed_share", heldout_scores="lagged", heldout_lag=50)  # lagged past a run
    prequential(learner, x, y, 1)
    assert learner.heldout.pool.weights[1] < learner.pool.weights[1] - 0.2
    scores = torch.stack([e.evaluate(x[:5]) for e in learner.experts])
    torch.testing.assert_close(learner.evaluate(x[:5]), learner.heldout.predict(scores))


def test_heldout_experts_are_scored_as_they_stood_lag_to_twice_lag_examples_ago():
    """``heldout_lag``: the held-out pool scores each new example with frozen copies of the
    experts (the network with its caches, both read-outs, SLDA's temperature) as they stood at the
    last multiple of the lag before the one before it (between lag and 2 lag examples old): what
    the experts' evaluate() there would have said of an example that far ahead."""
    x, y = clusters(23)
    lag, k = 5, 15  # after 23 examples, the copies made at 15 are the lagged ones
    experts = [TINY_NET, "linear", "slda"]
    learner = pooled(experts, heldout_scores="lagged", heldout_lag=lag)
    prequential(learner, x, y, 1)
    then = pooled(experts, heldout_mixture=False)  # the same experts, stopped at k
    prequential(then, x[:k], y[:k], 1)
    for lagged, stopped, now in zip(learner.heldout._lagged, then.experts, learner.experts):
        torch.testing.assert_close(lagged.evaluate(x), stopped.evaluate(x), rtol=0, atol=0)
        assert not torch.allclose(lagged.evaluate(x), now.evaluate(x))
    # frozen copies of the network in a checkpoint, label blindness with them, ...
    check_learner(functools.partial(PooledLearner, experts=experts, heldout_scores="lagged", heldout_lag=3))


@pytest.mark.parametrize("scores", ["lagged", "past", "mixed"])
def test_heldout_options_change_no_online_prediction(scores):
    """The held-out pool and its lagged copies only change ``evaluate``: the online predictions
    are exactly those of the learner without them (its experts learn and refresh alike: at
    D = 200 SLDA refreshes its precision every 3 examples, so a copy that refreshed it early
    would show)."""
    x, y = clusters(40, dim=200, spread=0.1)  # overlapping classes: SLDA far from saturated
    experts = [TINY_NET, "linear", "slda"]
    plain = prequential(PooledLearner(200, 3, seed=0, experts=experts, heldout_mixture=False), x, y, 1)
    held = prequential(PooledLearner(200, 3, seed=0, experts=experts, heldout_scores=scores, heldout_lag=5), x, y, 1)
    torch.testing.assert_close(held, plain, rtol=0, atol=0)


def test_heldout_past_draws_examples_older_than_heldout_skip():
    """``heldout_scores=past``: the held-out pool learns from revealed examples older than the
    newest ``heldout_skip`` (the experts as they are), drawn uniformly; none while there are none."""
    x, y = clusters(30)
    learner = pooled([TINY_NET, "slda"], heldout_scores="past", heldout_skip=4)
    ho = learner.heldout
    prequential(learner, x, y, 1, end=4)
    assert ho.pool.steps == 0
    prequential(learner, x, y, 1, start=4, end=30)
    assert ho.pool.steps == 30 - 5  # from the chunk at t = 5 on (t - skip > 0)
    drawn = [ho.history.sample(ho._rng, ho.t - 4, "cpu") for _ in range(200)]
    index = [int(torch.nonzero((x == xo).all(1))[0]) for xo, _ in drawn]
    assert set(index) == set(range(30 - 4))  # every older example, none of the newest 4
    assert all(torch.equal(yo, y[[i]]) for (_, yo), i in zip(drawn, index))


def test_heldout_past_examples_are_scored_in_batches_and_learned_one_per_chunk():
    """Past examples are drawn and scored ``PAST_BATCH`` at a time (one evaluate per expert), by
    the experts as they stand when drawn; the held-out pool learns from one per chunk, in draw order."""
    x, y = clusters(40)
    learner = pooled([TINY_NET, "linear", "slda"], heldout_scores="past", heldout_skip=4)
    ho = learner.heldout
    n = ho.PAST_BATCH
    prequential(learner, x, y, 1, end=5 + n)  # the first batch was drawn at t = 5 (t - skip > 0) and is used up
    assert not ho._past and ho.pool.steps == n
    xo, yo = ho.history.sample(copy.deepcopy(ho._rng), ho.t - 4, "cpu", n)
    expected = torch.stack([e.evaluate(xo) for e in learner.experts])  # (M, n, K): the experts as they are now
    prequential(learner, x, y, 1, start=5 + n, end=6 + n)
    assert len(ho._past) == n - 1 and ho.pool.steps == n + 1
    torch.testing.assert_close(torch.cat([sc for sc, _ in ho._past], 1), expected[:, 1:], rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([yc for _, yc in ho._past]), yo[1:])
    prequential(learner, x, y, 1, start=6 + n, end=5 + 2 * n)
    assert not ho._past and ho.pool.steps == 2 * n


def test_heldout_mixed_scores_the_newest_chunk_and_past_examples():
    """``heldout_scores=mixed``: one held-out step on the newest chunk as the online pool scored it
    and one on a past example; before any past example exists it learns exactly like the online pool."""
    x, y = clusters(12)
    learner = pooled([TINY_NET, "linear", "slda"], heldout_skip=4)
    prequential(learner, x, y, 1, end=5)
    torch.testing.assert_close(learner.heldout.pool.a, learner.pool.a, rtol=0, atol=0)
    prequential(learner, x, y, 1, start=5)
    assert learner.heldout.pool.steps == 12 + (12 - 5) and learner.pool.steps == 12
    assert not torch.allclose(learner.heldout.pool.a, learner.pool.a)


def test_pooled_side_files_go_to_one_folder_per_expert(tmp_path):
    """set_workdir: each expert's side files in its own folder (two transformers cannot collide),
    the held-out pool's past next to them."""
    learner = pooled([TINY_NET, {**TINY_NET, "window": 2}])
    learner.set_workdir(tmp_path)
    x, y = clusters(6)
    prequential(learner, x, y, 1)
    assert (tmp_path / "expert0-transformer" / "replay_history.bin").exists()
    assert (tmp_path / "expert1-transformer" / "replay_history.bin").exists()
    assert (tmp_path / "pooled_history.bin").exists()
