"""The transformer's prediction as a fixed-share mixture of its network and a linear read-out
(ocl/learners/transformer/mixture.py): the mixture's loss bounds, and the learner's output
against the two experts run separately."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.learners.checks import check_learner, clusters, prequential
from ocl.learners.linear import LinearLearner
from ocl.learners.slda import SLDALearner
from ocl.learners.transformer import Temperature, TransformerLearner
from ocl.learners.transformer.mixture import FixedShare, LogLinearPool

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# The two-expert fixed-share mixture; the default pool (loglinear, three experts) has its own test.
TINY = dict(d_model=16, n_layers=2, n_heads=2, window=4, replay_streams=2, lr=1e-2, warmup=0, pool="fixed_share",
            slda_expert=False, heldout_mixture=False)  # the held-out pool's tests turn it on


def _experts(T: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two experts' log-probs ``(2, T, K)`` and labels ``(T,)``: expert 0 is good in the first
    half, expert 1 in the second."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (T,), generator=g)
    logits = torch.randn(2, T, K, generator=g)
    first = torch.arange(T) < T // 2
    logits[0, first, y[first]] += 3.0
    logits[1, ~first, y[~first]] += 3.0
    return F.log_softmax(logits, dim=2), y


def _mixture_loss(mix: FixedShare, lp: torch.Tensor, y: torch.Tensor) -> float:
    """Total log-loss of the mixture fed one example at a time (predict, then update)."""
    total = 0.0
    for t in range(y.shape[0]):
        total -= float(mix.predict(lp[:, t : t + 1])[0, y[t]])
        mix.update(lp[:, t : t + 1], y[t : t + 1])
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bayes_mixture_is_within_log_m_of_the_best_expert(seed):
    lp, y = _experts(200, 5, seed)
    loss = _mixture_loss(FixedShare(2, share=0.0), lp, y)
    expert_loss = -lp.gather(2, y[None, :, None].expand(2, -1, 1)).sum((1, 2))
    assert loss <= float(expert_loss.min()) + math.log(2) + 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_share_tracks_the_expert_that_is_best_now(seed):
    """One switch of the best expert half way: fixed share pays at most the switching
    sequence's loss + log M + log(M / alpha) (one switch) + (T - 2) log(1 / (1 - alpha))
    (Herbster & Warmuth 1998), and clearly beats both single experts and the plain Bayes mixture."""
    T, alpha = 200, 0.01
    lp, y = _experts(T, 5, seed)
    hits = lp.gather(2, y[None, :, None].expand(2, -1, 1))[..., 0]  # (2, T)
    switching = float(-(hits[0, : T // 2].sum() + hits[1, T // 2 :].sum()))
    loss = _mixture_loss(FixedShare(2, share=alpha), lp, y)
    bound = switching + math.log(2) + math.log(2 / alpha) + (T - 2) * math.log(1 / (1 - alpha))
    assert loss <= bound + 1e-6
    assert loss < float(-hits.sum(1).min()) - 20
    assert loss < _mixture_loss(FixedShare(2, share=0.0), lp, y) - 20


def test_fixed_share_survives_an_expert_that_gives_the_truth_probability_zero():
    mix = FixedShare(2, share=0.01)
    lp = torch.log(torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]]))  # expert 0: p(y=1) = 0
    mix.update(lp, torch.tensor([1]))
    out = mix.predict(lp)
    assert torch.isfinite(out).all() and mix.weights[1] > 0.98
    assert torch.allclose(out.exp().sum(1), torch.ones(1))


@pytest.mark.parametrize("linear,slda", [(True, False), (True, True), (False, True)],
                         ids=["linear", "linear+slda", "slda"])
@pytest.mark.parametrize("C", [1, 3], ids=["C1", "C3"])
def test_learner_predicts_the_mixture_of_its_network_and_a_linear_read_out(C, linear, slda):
    """The learner against its experts run side by side: the network (the same options without
    the experts), a LinearLearner and (``slda_expert``) an SLDALearner, mixed by a FixedShare fed
    the same labels. Also: ``evaluate`` mixes the experts' evaluations with the current weights."""
    x, y = clusters(30)
    learner = TransformerLearner(8, 3, seed=0, **TINY | dict(linear_expert=linear, slda_expert=slda))
    experts_alone = [TransformerLearner(8, 3, seed=0, **TINY, linear_expert=False)]
    if linear:
        experts_alone.append(LinearLearner(8, 3, seed=0, lr=1.0))
    temperature = Temperature(lr=0.01)  # SLDA's calibration, fitted on chunks it has scored
    if slda:
        experts_alone.append(SLDALearner(8, 3, seed=0))

    def experts_on(xc: torch.Tensor, method: str) -> torch.Tensor:
        lp = [getattr(e, method)(xc) for e in experts_alone]
        return torch.stack(lp[:-1] + [F.log_softmax(lp[-1] * temperature.scale, dim=1) if slda else lp[-1]])

    mix = FixedShare(len(experts_alone), share=0.01)
    for s in range(0, 30, C):
        xc, yc = x[s : s + C], y[s : s + C]
        experts = experts_on(xc, "predict")
        torch.testing.assert_close(learner.predict(xc), mix.predict(experts), rtol=0, atol=1e-5)
        if slda:
            temperature.step(experts_alone[-1].predict(xc), yc)
        for model in (learner, *experts_alone):
            model.update(xc, yc)
        mix.update(experts, yc)
    if slda:
        assert temperature.log_scale != 0.0
    torch.testing.assert_close(learner.evaluate(x), mix.predict(experts_on(x, "evaluate")), rtol=0, atol=1e-5)
    assert max(mix.weights[1:]) > 0.5  # 30 examples: a read-out still leads (they learn in a few steps)


def test_learner_with_the_mixture_keeps_the_contract():
    """Label blindness, seeding, exact resume (the expert and the weights are checkpointed),
    a stateless evaluate, bad inputs: the whole contract, at the tiny size."""
    check_learner(functools.partial(TransformerLearner, **TINY))
    check_learner(functools.partial(TransformerLearner, **TINY | dict(slda_expert=True)))


@pytest.mark.parametrize("bad", [{"share": 1.0}, {"share": -0.1}, {"linear_lr": 0.0}, {"linear_lr": float("nan")},
                                 {"pool": "product"},
                                 {"heldout_scores": "future"}, {"heldout_lag": 0}])
def test_bad_mixture_options_are_refused(bad):
    with pytest.raises(OCLError, match=next(iter(bad))):
        TransformerLearner(8, 3, **bad)


def test_without_the_expert_the_learner_is_the_network():
    x, y = clusters(20)
    learner = TransformerLearner(8, 3, seed=0, **TINY, linear_expert=False)
    assert learner.readouts is None
    alone = prequential(learner, x, y, 1)
    mixed = prequential(TransformerLearner(8, 3, seed=0, **TINY), x, y, 1)
    assert (alone - mixed).abs().max() > 0.01


def test_heldout_mixture_weighs_experts_by_how_they_score_unseen_examples():
    """``heldout_mixture``: evaluate() mixes the experts' held-out predictions with weights of
    their own. On a stream whose labels come in long runs and whose inputs carry no class
    information, the online weights go to whoever follows the runs (the fast linear read-out's
    bias); held out, its lagged copy cannot follow them, so it must lose weight there."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat_interleave(40) % 3  # runs of 40
    x = torch.randn(y.shape[0], 8, generator=g)  # no information about the class
    cfg = dict(TINY, heldout_mixture=True, heldout_scores="lagged", heldout_lag=50, eval_context="none")  # lagged past a whole run
    learner = TransformerLearner(8, 3, seed=0, **cfg)
    prequential(learner, x, y, 1)
    assert learner.readouts.heldout.weights[1] < learner.readouts.pool.weights[1] - 0.2
    experts = learner.readouts.experts(learner.heldout_log_probs(x[:5]), x[:5])
    torch.testing.assert_close(learner.evaluate(x[:5]), learner.readouts.heldout.predict(experts))
    check_learner(functools.partial(TransformerLearner, **cfg))


def test_loglinear_pool_steps_adam_on_its_log_loss():
    """LogLinearPool's closed-form gradient is autograd's, its step torch.optim.Adam's; the
    learner with ``pool=loglinear`` predicts that pool of its experts and keeps the contract."""
    lp, y = _experts(12, 4, seed=0)
    pool = LogLinearPool(2, lr=0.05)
    a = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a], lr=0.05)
    for t in range(0, 12, 3):
        chunk, yc = lp[:, t : t + 3], y[t : t + 3]
        torch.testing.assert_close(pool.predict(chunk), torch.log_softmax((a.detach()[:, None, None] * chunk.double()).sum(0), 1).float())
        opt.zero_grad()
        F.cross_entropy((a[:, None, None] * chunk.double()).sum(0), yc).backward()
        opt.step()
        pool.update(chunk, yc)
        torch.testing.assert_close(pool.a, a.detach())
    learner = TransformerLearner(8, 3, seed=0, **TINY | dict(pool="loglinear"))
    assert isinstance(learner.readouts.pool, LogLinearPool) and len(learner.readouts.pool.weights) == 2
    default = TransformerLearner(8, 3, seed=0)  # the defaults: network, linear and SLDA, pooled log-linearly
    assert isinstance(default.readouts.pool, LogLinearPool) and len(default.readouts.pool.weights) == 3
    check_learner(functools.partial(TransformerLearner, **TINY | dict(pool="loglinear", slda_expert=True)))


def test_heldout_experts_are_scored_as_they_stood_lag_to_twice_lag_examples_ago():
    """``heldout_lag``: the held-out pool scores each new example with frozen copies of the
    experts (the network with its caches, both read-outs) as they stood at the last multiple of
    the lag before the one before it (between lag and 2 lag examples old): what the learner's
    evaluate() there would have said of an example that far ahead."""
    x, y = clusters(23)
    lag, k = 5, 15  # after 23 examples, the copies made at 15 are the lagged ones
    cfg = TINY | dict(slda_expert=True)
    learner = TransformerLearner(8, 3, seed=0, **cfg | dict(heldout_mixture=True, heldout_scores="lagged", heldout_lag=lag))
    prequential(learner, x, y, 1)
    then = TransformerLearner(8, 3, seed=0, **cfg)  # the same learner, stopped at k
    prequential(then, x[:k], y[:k], 1)
    net, linear, slda = learner.readouts._lagged
    torch.testing.assert_close(net.heldout_log_probs(x), then.heldout_log_probs(x), rtol=0, atol=0)
    torch.testing.assert_close(linear.predict(x), then.readouts.linear.predict(x), rtol=0, atol=0)
    torch.testing.assert_close(slda.predict(x), then.readouts.slda.predict(x), rtol=0, atol=0)
    assert not torch.allclose(net.heldout_log_probs(x), learner.heldout_log_probs(x))
    assert not torch.allclose(linear.predict(x), learner.readouts.linear.predict(x))
    check_learner(functools.partial(TransformerLearner, **cfg | dict(heldout_mixture=True, heldout_scores="lagged",
                                                                     heldout_lag=3)))



@pytest.mark.parametrize("scores", ["lagged", "past", "mixed"])
def test_heldout_options_change_no_online_prediction(scores):
    """The held-out pool and its lagged copies only change ``evaluate``: the online predictions
    are exactly those of the learner without them (its read-outs learn and refresh alike: at
    D = 200 SLDA refreshes its precision every 3 examples, so a copy that refreshed it early
    would show)."""
    x, y = clusters(40, dim=200, spread=0.1)  # overlapping classes: SLDA far from saturated
    cfg = TINY | dict(slda_expert=True, pool="loglinear")
    plain = prequential(TransformerLearner(200, 3, seed=0, **cfg), x, y, 1)
    held = prequential(TransformerLearner(200, 3, seed=0, **cfg | dict(heldout_mixture=True, heldout_scores=scores,
                                                                       heldout_lag=5)), x, y, 1)
    torch.testing.assert_close(held, plain, rtol=0, atol=0)


def test_heldout_past_scores_examples_older_than_the_context():
    """``heldout_scores=past``: the held-out pool learns from revealed examples older than the
    context window (the experts as they are), drawn uniformly; none while there are none."""
    x, y = clusters(30)
    cfg = TINY | dict(slda_expert=True, pool="loglinear", heldout_mixture=True, heldout_scores="past")  # window 4
    learner = TransformerLearner(8, 3, seed=0, **cfg)
    prequential(learner, x, y, 1, end=4)
    assert learner.readouts.heldout.steps == 0
    prequential(learner, x, y, 1, start=4, end=30)
    assert learner.readouts.heldout.steps == 30 - 5  # from the chunk at t = 5 on (t - window > 0)
    drawn = [learner.history.sample(learner._past_rng, learner.t - 4, "cpu") for _ in range(200)]
    index = [int(torch.nonzero((x == xo).all(1))[0]) for xo, _ in drawn]
    assert set(index) == set(range(30 - 4))  # every older example, none in the context
    assert all(torch.equal(yo, y[[i]]) for (_, yo), i in zip(drawn, index))
    check_learner(functools.partial(TransformerLearner, **cfg))


def test_heldout_past_examples_are_scored_in_batches_and_learned_one_per_chunk():
    """Past examples are drawn and scored ``PAST_BATCH`` at a time (one network forward), by the
    experts as they stand when drawn; the held-out pool learns from one per chunk, in draw order."""
    x, y = clusters(40)
    cfg = TINY | dict(slda_expert=True, pool="loglinear", heldout_mixture=True, heldout_scores="past")  # window 4
    learner = TransformerLearner(8, 3, seed=0, **cfg)
    ro = learner.readouts
    n = ro.PAST_BATCH
    prequential(learner, x, y, 1, end=5 + n)  # the first batch was drawn at t = 5 (t - window > 0) and is used up
    assert not ro._past and ro.past_wanted == n and ro.heldout.steps == n
    drawn = learner.history.sample(copy.deepcopy(learner._past_rng), learner.t - 4, "cpu", n)
    expected = ro._scores(learner, ro.linear, ro.slda, drawn[0])  # (M, n, K): the experts as they are now
    prequential(learner, x, y, 1, start=5 + n, end=6 + n)
    assert ro.past_wanted == 0 and len(ro._past) == n - 1 and ro.heldout.steps == n + 1
    torch.testing.assert_close(torch.cat([sc for sc, _ in ro._past], 1), expected[:, 1:], rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([yo for _, yo in ro._past]), drawn[1][1:])
    prequential(learner, x, y, 1, start=6 + n, end=5 + 2 * n)
    assert not ro._past and ro.past_wanted == n and ro.heldout.steps == 2 * n


def test_heldout_mixed_scores_the_newest_chunk_and_past_examples():
    """``heldout_scores=mixed``: one held-out step on the newest chunk as the online pool scored it
    and one on a past example; before any past example exists it learns exactly like the online pool."""
    x, y = clusters(12)
    cfg = TINY | dict(slda_expert=True, pool="loglinear", heldout_mixture=True, heldout_scores="mixed")  # window 4
    learner = TransformerLearner(8, 3, seed=0, **cfg)
    prequential(learner, x, y, 1, end=5)
    torch.testing.assert_close(learner.readouts.heldout.a, learner.readouts.pool.a, rtol=0, atol=0)
    prequential(learner, x, y, 1, start=5)
    assert learner.readouts.heldout.steps == 12 + (12 - 5) and learner.readouts.pool.steps == 12
    assert not torch.allclose(learner.readouts.heldout.a, learner.readouts.pool.a)
