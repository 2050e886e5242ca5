"""Transformer-XL segment training (``segment`` = G > 1): every example predicted from stream 0's
cache, a gradient step every G examples over segments in which keys, values and the label
projection learn. The properties of DESIGN.md section 2 over a grid of G and C."""

import math

import pytest
import torch
import torch.nn.functional as F

from ocl.learners.checks import clusters, prequential
from ocl.learners.transformer import TransformerLearner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MODES = ["kv", "context"]
TINY = dict(d_model=16, n_layers=2, n_heads=2, window=4, replay_streams=3, lr=1e-2, warmup=0)
GRID = [(1, 1), (4, 1), (4, 2), (4, 3), (6, 2)]  # (G, C): C divides G or not, G = 1 as today
#: label modes, with the copy read-out (the default, with its learned recency) and without
VARIANTS = {"kv": dict(label_mode="kv"), "context": dict(label_mode="context"),
            "kv-nocopy": dict(label_mode="kv", copy=False), "context-nocopy": dict(label_mode="context", copy=False),
            "kv-fixed-recency": dict(label_mode="kv", copy_recency=False)}


@pytest.mark.parametrize("G,C", GRID, ids=[f"G{g}C{c}" for g, c in GRID])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_future_labels_never_change_logged_predictions(variant, G, C):
    n, K = 20, 3
    x, y = clusters(n, classes=K)
    make = lambda: TransformerLearner(8, K, seed=0, segment=G, **VARIANTS[variant], **TINY)  # noqa: E731
    base = prequential(make(), x, y, C)
    g = torch.Generator().manual_seed(1)
    for t in [0, 5, 11]:
        y2 = y.clone()
        y2[t:] = (y[t:] + torch.randint(1, K, (n - t,), generator=g)) % K  # every label from t on differs
        out = prequential(make(), x, y2, C)
        assert torch.equal(out[: t + 1], base[: t + 1]), f"prediction at or before {t} saw a label >= {t}"
        after_chunk = (t // C + 1) * C  # later chunks have seen y_t: they must react (the test can fail)
        assert not torch.allclose(out[after_chunk:], base[after_chunk:])


def full_recompute(model, x, y, chunk_start, W):
    """One cache-free forward over the stream with the mask incremental processing implies:
    example i sees the W examples before its chunk (``chunk_start[i]``) and its chunk's earlier ones."""
    n, tpe = x.shape[1], model.tokens_per_example
    q_lo = ((chunk_start - W) * tpe).repeat_interleave(tpe)[None]
    return model(x, y, torch.arange(n)[None], q_lo=q_lo)[0]


@pytest.mark.parametrize("G,C", [(1, 1), (4, 1), (4, 3), (5, 2)], ids=["G1C1", "G4C1", "G4C3", "G5C2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predictions_from_the_cache_equal_full_recomputation_when_weights_are_frozen(variant, G, C):
    """With lr = 0 the weights never move: every logged prediction, made from the cache that
    updates and steps filled (the ring wraps many times; with ``copy``, the cached labels too),
    equals one forward over the stream."""
    n, W = 23, 3
    x, y = clusters(n)
    learner = TransformerLearner(8, 3, seed=0, segment=G, **VARIANTS[variant],
                                 **{**TINY, "window": W, "lr": 0.0, "temperature": False})
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    logged = prequential(learner, x, y, C)
    starts = torch.arange(n) // C * C
    ref = []
    with torch.no_grad():
        for s in range(0, n, C):  # each chunk as predicted: the stream so far, the chunk's labels unknown
            e = min(s + C, n)
            y_seen = torch.cat([y[:s], torch.full((e - s,), 3)])  # 3 = K: "unknown" (copy: not revealed)
            ref.append(full_recompute(learner.model.eval(), x[None, :e], y_seen[None], starts[:e], W)[0, s:])
    torch.testing.assert_close(logged, F.log_softmax(torch.cat(ref), 1), rtol=1e-4, atol=1e-5)
    # and held-out examples see stream 0's last W examples, as a next example would at C = 1
    held = learner.evaluate(x[:5])
    with torch.no_grad():  # each held-out example alone after the stream: n + 1 examples, the last at n
        for i in range(5):
            xi = torch.cat([x, x[i : i + 1]])[None]
            yi = torch.cat([y, torch.zeros(1, dtype=torch.long)])[None]
            st = torch.cat([starts, torch.tensor([n])])
            ref_i = full_recompute(learner.model, xi, yi, st, W)[0, -1]
            torch.testing.assert_close(held[i], F.log_softmax(ref_i, 0), rtol=1e-4, atol=1e-5)


def _kv_grads(G: int) -> dict[str, float]:
    """Gradient norms of the key/value rows of the first block's qkv and of the label projection
    after a stream of steps at segment G (kv mode, C = 1)."""
    x, y = clusters(12)
    learner = TransformerLearner(8, 3, seed=0, segment=G, **TINY)
    prequential(learner, x, y, 1)
    d = TINY["d_model"]
    grad = learner.model.blocks[0].qkv.weight.grad
    return {"kv": float(grad[d:].norm()), "label": float(learner.model.label_kv.weight.grad.norm()),
            "q": float(grad[:d].norm())}


def test_keys_values_and_label_projection_learn_only_with_segments():
    one, seg = _kv_grads(1), _kv_grads(4)
    # G = 1, C = 1: every query attends to detached cache entries only: K/V get nothing
    assert one["q"] > 0 and one["kv"] == 0 and one["label"] == 0
    assert seg["kv"] > 1e-6 and seg["label"] > 1e-6  # G = 4: through the segment's own keys/values
    x, y = clusters(12)
    learner = TransformerLearner(8, 3, seed=0, segment=4, **TINY)
    before = learner.model.label_kv.weight.detach().clone()
    prequential(learner, x, y, 1)
    assert not torch.allclose(learner.model.label_kv.weight, before)


def test_a_step_every_g_examples_and_the_segment_resumes_mid_way():
    x, y = clusters(11)
    learner = TransformerLearner(8, 3, seed=0, segment=4, **TINY)
    steps = []
    for i in range(11):
        learner.predict(x[i : i + 1])
        before = learner.opt.flat.clone()
        learner.update(x[i : i + 1], y[i : i + 1])
        steps.append(not torch.equal(before, learner.opt.flat))
    assert [i for i, s in enumerate(steps) if s] == [3, 7]  # after the 4th and 8th examples
    assert learner.t == 11 and len(learner.history) == 8 and len(learner._segment) == 3


@pytest.mark.parametrize("mode", MODES)
def test_segments_learn_gaussian_clusters_online(mode):
    x, y = clusters(300, classes=4, spread=1.5)
    learner = TransformerLearner(8, 4, seed=0, label_mode=mode, segment=8, **{**TINY, "window": 8})
    logp = prequential(learner, x, y, 1)
    acc = (logp.argmax(1) == y).float()
    assert acc[200:].mean() > 0.7 > acc[:20].mean()  # chance 0.25; G = 1 gets 0.80 (kv), 0.76 (context)


def test_a_non_finite_segment_is_skipped_whole_and_learning_goes_on():
    x, y = clusters(20)
    learner = TransformerLearner(8, 3, seed=0, segment=4, **TINY)
    prequential(learner, x[:10], y[:10], 2)  # two steps, and half a segment
    params = learner.opt.flat.clone()
    bad = x[10:12].clone()
    bad[0, 0] = float("nan")
    learner.predict(bad)
    learner.update(bad, y[10:12])  # completes the segment: its loss is not finite
    assert learner.skipped_updates == 1 and len(learner.history) == 8 and torch.equal(learner.opt.flat, params)
    assert (learner.cache.positions(slice(None)) == -1).all()  # caches that may hold NaN are emptied
    logp = prequential(learner, x[12:], y[12:], 2)
    assert torch.isfinite(logp).all() and learner.skipped_updates == 1 and len(learner.history) == 16


def test_the_copy_read_out_predicts_from_context_before_any_weight_has_learned():
    """lr = 0: no weight ever moves, the head stays uniform; on runs of labels whose features say
    nothing, the copied labels of the recent (ALiBi-weighted) context alone follow the runs."""
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 2, 1, 0, 1, 2]).repeat_interleave(20)
    x = torch.randn(len(y), 8, generator=g)
    frozen = {**TINY, "window": 16, "lr": 0.0, "temperature": False}
    logp = prequential(TransformerLearner(8, 3, seed=0, **frozen), x, y, 1)
    later = torch.arange(len(y)) % 20 >= 10  # the second half of each run
    assert (logp.argmax(1) == y)[later].float().mean() > 0.9
    plain = prequential(TransformerLearner(8, 3, seed=0, copy=False, **frozen), x, y, 1)
    torch.testing.assert_close(plain, torch.full_like(plain, -math.log(3)))  # without it: the uniform head


def test_copy_recency_starts_as_the_layers_slopes_and_learns_to_favour_recent_labels():
    """copy_recency (default on): a learned log-scale per head of the copy's ALiBi slopes. At 0 (its start) the
    predictions are those without it; on runs of labels whose features say nothing it grows (the
    recent labels are the ones to copy), with finite gradients although masked slots are -inf."""
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 2, 1, 0, 1, 2]).repeat_interleave(10).repeat(4)
    x = torch.randn(len(y), 8, generator=g)
    opts = {**TINY, "window": 16, "lr": 3e-2}
    frozen = {**opts, "lr": 0.0}
    plain = prequential(TransformerLearner(8, 3, seed=0, copy_recency=False, **frozen), x, y, 1)
    start = TransformerLearner(8, 3, seed=0, copy_recency=True, **frozen)
    torch.testing.assert_close(prequential(start, x, y, 1), plain)
    learner = TransformerLearner(8, 3, seed=0, copy_recency=True, **opts)
    hits = (prequential(learner, x, y, 1).argmax(1) == y).float().mean()
    scale = learner.model.copy_slope_log_scale
    assert learner.skipped_updates == 0 and torch.isfinite(scale).all()
    assert scale.max() > 1.0  # a head's slope grew e-fold or more (to ~e^4 here)
    fixed = TransformerLearner(8, 3, seed=0, copy_recency=False, **opts)
    without = (prequential(fixed, x, y, 1).argmax(1) == y).float().mean()
    assert hits > without + 0.2  # 0.72 against 0.31 here
