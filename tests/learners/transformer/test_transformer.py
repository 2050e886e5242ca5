"""Transformer learner: the correctness properties of DESIGN.md section 2, and that it learns."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ocl.errors import OCLError
from ocl.learners.checks import clusters, prequential
from ocl.learners.common import Temperature
from ocl.learners.transformer.cuda_graphs import StepGraphs
from ocl.learners.transformer.kv_cache import KVCache
from ocl.learners.transformer.replay import stream_weights
from ocl.learners.transformer import OnlineTransformer, TransformerConfig, TransformerLearner, split_heads

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MODES = ["kv", "context"]
# Tiny, fast, and every mechanism on: replay, a window that wraps, calibration.
# The learner is the network alone (pooling it with read-outs: tests/learners/pooled/).
TINY = dict(d_model=16, n_layers=2, n_heads=2, window=4, replay_streams=2, lr=1e-2, warmup=0)


# ----------------------------------------------------------------- property 1: label blindness
@pytest.mark.parametrize("C", [1, 3], ids=["C1", "C3"])
@pytest.mark.parametrize("mode", MODES)
def test_future_labels_never_change_logged_predictions(mode, C):
    n, K = 14, 3
    x, y = clusters(n, classes=K)
    base = prequential(TransformerLearner(8, K, seed=0, label_mode=mode, **TINY), x, y, C)
    g = torch.Generator().manual_seed(1)
    for t in [0, 4, 8]:
        y2 = y.clone()
        y2[t:] = (y[t:] + torch.randint(1, K, (n - t,), generator=g)) % K  # every label from t on differs
        out = prequential(TransformerLearner(8, K, seed=0, label_mode=mode, **TINY), x, y2, C)
        assert torch.equal(out[: t + 1], base[: t + 1]), f"prediction at or before {t} saw a label >= {t}"
        after_chunk = (t // C + 1) * C  # later chunks have seen y_t: they must react (the test can fail)
        assert not torch.allclose(out[after_chunk:], base[after_chunk:])


# ------------------------------------------------- property 2: incremental == full recomputation
def _model(mode: str, seed: int = 0, **kw) -> OnlineTransformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(label_mode=mode, **{**TINY, **kw})
    model = OnlineTransformer(8, 3, cfg).eval()
    with torch.no_grad():  # the head is zero-initialised; make outputs informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def full_recompute(model, x, y, chunk_start, W, windowed=True):
    """One cache-free forward over the whole stream with the block-banded mask that chunked
    Transformer-XL processing implies: example i sees its chunk's earlier examples and the W
    examples before its chunk (``chunk_start[i]``)."""
    B, n, _ = x.shape
    tpe = model.tokens_per_example
    pos = torch.arange(n)[None].expand(B, n)
    q_lo = ((chunk_start - W) * tpe).repeat_interleave(tpe)[None].expand(B, n * tpe) if windowed else None
    return model(x, y, pos, q_lo=q_lo)[0]


def incremental(model, x, y, chunks, W, cache=None):
    B, n, _ = x.shape
    H, Dh, L = model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads, model.cfg.n_layers
    cache = cache or KVCache(L, B, H, W * model.tokens_per_example, Dh)
    rows, out, s = torch.arange(B), [], 0
    for c in chunks:
        pos = torch.arange(s, s + c)[None].expand(B, c)
        ctx = [cache.read(layer, slice(None)) for layer in range(L)]
        logits, ks, vs, tpos = model(x[:, s : s + c], y[:, s : s + c], pos, ctx, cache.positions(slice(None)),
                                     cache.labels)
        cache.write(rows, tpos, ks, vs, model.token_labels(y[:, s : s + c]))
        out.append(logits)
        s += c
    return torch.cat(out, 1)


@pytest.mark.parametrize("chunks", [[1] * 20, [3] * 6 + [2], [2, 5, 1, 3, 4, 1, 4]], ids=["C1", "C3", "mixed"])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_incremental_equals_full_recomputation_with_wrapped_ring(mode, chunks):
    W, n = 4, sum(chunks)  # n >> W: the ring buffer wraps many times
    model = _model(mode)
    x, y = torch.randn(2, n, 8), torch.randint(0, 3, (2, n))
    starts = torch.repeat_interleave(torch.tensor(np.cumsum([0] + chunks[:-1])), torch.tensor(chunks))
    inc = incremental(model, x, y, chunks, W)
    torch.testing.assert_close(inc, full_recompute(model, x, y, starts, W), rtol=1e-4, atol=1e-5)
    # the window matters: attending to everything before gives different outputs
    assert not torch.allclose(inc, full_recompute(model, x, y, starts, W, windowed=False), atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_learner_predictions_equal_full_recomputation_when_weights_are_frozen(mode):
    n, W = 16, 3
    x, y = clusters(n)
    learner = TransformerLearner(8, 3, seed=0, label_mode=mode, **{**TINY, "window": W, "lr": 0.0,
                                                                   "temperature": False})
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    logged = prequential(learner, x, y, 1)  # replay stream runs too but shares nothing with stream 0
    ref = full_recompute(learner.model.eval(), x[None], y[None], torch.arange(n), W)[0]
    torch.testing.assert_close(logged, F.log_softmax(ref, 1), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------- property 3: independent replay caches
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_stream_caches_are_independent_and_reset_starts_empty(mode):
    model, W, chunks = _model(mode), 3, [2] * 5
    x, y = torch.randn(3, 10, 8), torch.randint(0, 3, (3, 10))
    x2, y2 = x.clone(), y.clone()
    x2[1], y2[1] = torch.randn(10, 8), (y[1] + 1) % 3  # only stream 1 changes
    a, b = incremental(model, x, y, chunks, W), incremental(model, x2, y2, chunks, W)
    assert torch.equal(a[[0, 2]], b[[0, 2]])
    assert not torch.allclose(a[1], b[1])

    # after reset(1), stream 1 behaves exactly like a fresh stream; the others keep their context
    L, H, Dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads
    cache = KVCache(L, 3, H, W * model.tokens_per_example, Dh)
    incremental(model, x, y, chunks, W, cache)
    cache.reset(1)
    assert (cache.pos[1] == -1).all() and (cache.k[:, 1] == 0).all()
    nx, ny = torch.randn(3, 2, 8), torch.randint(0, 3, (3, 2))
    pos = torch.tensor([[10, 11], [50, 51], [10, 11]])  # stream 1 jumped elsewhere
    ctx = [cache.read(layer, slice(None)) for layer in range(L)]
    after_reset = model(nx, ny, pos, ctx, cache.positions(slice(None)))[0]
    fresh = model(nx[1:2], ny[1:2], pos[1:2])[0]
    torch.testing.assert_close(after_reset[1], fresh[0])
    assert not torch.allclose(after_reset[0], model(nx[0:1], ny[0:1], pos[0:1])[0][0])


def test_replay_only_reads_revealed_examples_and_never_touches_stream_zero():
    x, y = clusters(40)
    learner = TransformerLearner(8, 3, seed=0, **{**TINY, "replay_streams": 4})
    reads, orig = [], learner.history.chunks

    def spy(starts, length):
        reads.append((int(starts.max()) + length, len(learner.history), learner.t))
        return orig(starts, length)

    learner.history.chunks = spy
    cache0 = []
    for s in range(0, 40, 2):
        learner.predict(x[s : s + 2])
        before = learner.cache.pos[0].clone()
        learner.update(x[s : s + 2], y[s : s + 2])
        cache0.append(set(learner.cache.pos[0].tolist()) - {-1})
        assert set(learner.cache.pos[0].tolist()) - {-1} == set(range(max(0, s + 2 - 4), s + 2))
        del before
    assert len(reads) == 19  # every update but the first (no history yet) replayed
    for end, n_hist, t in reads:
        assert end <= n_hist == t  # within the revealed past; the chunk being learned is not in it yet


# ------------------------------------------------------ property 4: kv mode, label-free queries
@torch.no_grad()
def test_kv_mode_labels_reach_keys_values_but_never_queries_or_residuals():
    model = _model("kv")
    n = 12
    x, y = torch.randn(1, n, 8), torch.randint(0, 3, (1, n))
    pos = torch.arange(n)[None]

    def traced(labels, **kw):
        trace = []
        model(x.view(n, 1, 8) if kw.get("single") else x, labels.view(n, 1) if kw.get("single") else labels,
              pos.view(n, 1) if kw.get("single") else pos, trace=trace)
        return trace

    # Examples processed one by one (no context): the whole query path is label-free.
    a, b = traced(y, single=True), traced((y + 1) % 3, single=True)
    for la, lb in zip(a, b):
        assert torch.equal(la["h"], lb["h"]) and torch.equal(la["q"], lb["q"])
        assert not torch.allclose(la["k"], lb["k"]) and not torch.allclose(la["v"], lb["v"])
    # In a sequence: random labels from position j on leave every layer's residual stream and
    # query of tokens <= j unchanged (own label included) while changing their keys/values.
    g = torch.Generator().manual_seed(0)
    for j in [0, 5, 11]:
        y2 = y.clone()
        y2[:, j:] = (y[:, j:] + torch.randint(1, 3, (1, n - j), generator=g)) % 3
        a, b = traced(y), traced(y2)
        for la, lb in zip(a, b):
            assert torch.equal(la["h"][:, : j + 1], lb["h"][:, : j + 1])
            assert torch.equal(la["q"][:, :, : j + 1], lb["q"][:, :, : j + 1])
            assert not torch.allclose(la["k"][:, :, j], lb["k"][:, :, j])
            assert not torch.allclose(la["v"][:, :, j], lb["v"][:, :, j])
        # ... and labels before j do reach later tokens' residual streams (through values)
        if j == 5:
            y3 = y.clone()
            y3[:, 2] = (y[:, 2] + 1) % 3
            assert not torch.allclose(traced(y3)[1]["h"][:, 3:], a[1]["h"][:, 3:])


# ------------------------------------ one forward per step at C = 1 (kv mode): why it is exact
@torch.no_grad()
def _labelled_and_label_free(model, B=3, S=4):
    """Forwards of a C = 1 chunk per stream over a filled cache, with and without labels."""
    L, H, Dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads
    g = torch.Generator().manual_seed(5)
    ctx = [(torch.randn(B, H, S, Dh, generator=g), torch.randn(B, H, S, Dh, generator=g)) for _ in range(L)]
    ctx_pos = torch.arange(S).repeat(B, 1)
    x, y, pos = torch.randn(B, 1, 8, generator=g), torch.randint(0, 3, (B, 1), generator=g), torch.full((B, 1), S)
    return (x, pos, ctx, ctx_pos), y


def test_c1_kv_labels_only_reach_the_cache_so_predict_can_run_the_training_forward():
    """TransformerLearner.shares_forward: at C = 1 in kv mode a forward with labels gives the same
    logits as one without, gradients exactly zero for the label weights (and none that differ
    elsewhere), and keys/values that differ by exactly the label terms added afterwards."""
    model = _model("kv").train()
    (x, pos, ctx, ctx_pos), y = _labelled_and_label_free(model)
    out = {}
    for name, labels in (("labelled", y), ("free", None)):
        model.zero_grad(set_to_none=True)
        logits, ks, vs, _ = model(x, labels, pos, ctx, ctx_pos)
        logits.square().sum().backward()
        out[name] = logits, ks, vs, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    (la, ka, va, ga), (lf, kf, vf, gf) = out["labelled"], out["free"]
    assert torch.equal(la, lf)
    for name in ga:
        if name.startswith("label_"):
            assert gf[name] is None and not ga[name].any(), name  # exactly zero with labels
        else:
            assert torch.equal(ga[name], gf[name]), name
    lab = model.label_terms(y)
    for layer, (k, v) in enumerate(zip(kf, vf)):
        lk, lv = split_heads(lab[layer], model.cfg.n_heads)
        torch.testing.assert_close(k + lk, ka[layer], rtol=0, atol=1e-6)
        torch.testing.assert_close(v + lv, va[layer], rtol=0, atol=1e-6)
    # with C = 2 the first example's label reaches the second one's logits: no sharing then
    ctx2 = [(k[:, :, :2], v[:, :, :2]) for k, v in ctx]
    x2, y2, pos2 = torch.randn(3, 2, 8), torch.randint(0, 3, (3, 2)), torch.tensor([[2, 3]] * 3)
    with torch.no_grad():
        assert not torch.allclose(model(x2, y2, pos2, ctx2, ctx_pos[:, :2])[0][:, 1],
                                  model(x2, (y2 + 1) % 3, pos2, ctx2, ctx_pos[:, :2])[0][:, 1])


def test_shared_forward_learns_exactly_like_a_forward_per_call(monkeypatch):
    """The C = 1 kv path (predict runs the training forward) against the general one (predict's
    own forward, update's forward with labels): same predictions along a stream with replay,
    a wrapped ring, temperature and a mismatched update (predict x, update another x)."""
    x, y = clusters(40)
    cfg = {**TINY, "replay_streams": 3, "temperature": True}
    shared = TransformerLearner(8, 3, seed=0, **cfg)
    assert shared.shares_forward(1) and not shared.shares_forward(2)
    assert not TransformerLearner(8, 3, label_mode="context", **TINY).shares_forward(1)
    assert not TransformerLearner(8, 3, dropout=0.1, **TINY).shares_forward(1)
    a = prequential(shared, x[:30], y[:30], 1)
    shared.predict(x[30:31])
    shared.update(x[31:32], y[31:32])  # not the chunk it predicted: update runs its own forward
    a2 = prequential(shared, x[32:], y[32:], 1)
    monkeypatch.setattr(TransformerLearner, "shares_forward", lambda self, C: False)
    general = TransformerLearner(8, 3, seed=0, **cfg)
    b = prequential(general, x[:30], y[:30], 1)
    general.update(x[31:32], y[31:32])
    b2 = prequential(general, x[32:], y[32:], 1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a2, b2, rtol=0, atol=1e-5)
    assert not torch.allclose(a[:1], a[-1:])  # it learned something


def test_predict_changes_no_state():
    x, y = clusters(20)
    learner = TransformerLearner(8, 3, seed=0, **{**TINY, "replay_streams": 3})
    prequential(learner, x[:12], y[:12], 1)
    state = (learner.cache.kv.clone(), learner.cache.pos.clone(), learner.cursors.pos.copy(),
             learner.cursors.rng.bit_generator.state, [p.clone() for p in learner.model.parameters()])
    first = learner.predict(x[12:13])
    for C in (1, 3, 1):
        learner.predict(x[12 : 12 + C])
    assert torch.equal(learner.cache.kv, state[0]) and torch.equal(learner.cache.pos, state[1])
    assert (learner.cursors.pos == state[2]).all() and learner.cursors.rng.bit_generator.state == state[3]
    assert all(torch.equal(p, q) for p, q in zip(learner.model.parameters(), state[4]))
    assert torch.equal(learner.predict(x[12:13]), first)


def test_temperature_step_is_adam_on_the_log_scale():
    """The closed-form gradient + float Adam against autograd + torch.optim.Adam."""
    g = torch.Generator().manual_seed(0)
    temp = Temperature(lr=0.05)
    log_scale = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([log_scale], lr=0.05)
    for step in range(20):
        z, yy = torch.randn(4, 5, generator=g) * 3, torch.randint(0, 5, (4,), generator=g)
        temp.step(z, yy)
        opt.zero_grad()
        F.cross_entropy(z * log_scale.exp(), yy).backward()
        opt.step()
        assert abs(temp.log_scale - log_scale.item()) < 1e-5
    assert abs(temp.log_scale) > 0.05  # it moved
    before = temp.log_scale
    temp.step(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))  # a non-finite chunk: skipped
    assert temp.log_scale == before


# ----------------------------------------------------------------- property 5: determinism
def test_runs_are_deterministic_for_a_seed_and_differ_across_seeds():
    x, y = clusters(30)
    cfg = {**TINY, "replay_streams": 3, "dropout": 0.1}
    runs = [prequential(TransformerLearner(8, 3, seed=s, **cfg), x, y, 2) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_stream0_weight_one_learns_as_if_there_were_no_replay_streams():
    """``stream0_weight=1``: the replay streams still run but get no loss, and streams are
    independent in the forward, so the weights (hence every prediction) follow R = 1's; any
    other weight changes them (the option is wired in), and the default (0.5) is not the uniform
    weighting (null)."""
    x, y = clusters(30)
    alone = prequential(TransformerLearner(8, 3, seed=0, **{**TINY, "replay_streams": 1}), x, y, 1)
    cfg = {**TINY, "replay_streams": 3}
    ignored = prequential(TransformerLearner(8, 3, seed=0, **cfg, stream0_weight=1.0), x, y, 1)
    torch.testing.assert_close(ignored, alone, rtol=0, atol=1e-4)  # float rounding: B = 3 vs 1 forwards
    half = prequential(TransformerLearner(8, 3, seed=0, **cfg, stream0_weight=0.5), x, y, 1)
    uniform = prequential(TransformerLearner(8, 3, seed=0, **cfg, stream0_weight=None), x, y, 1)
    assert (half - alone).abs().max() > 1e-3 and (half - uniform).abs().max() > 1e-3
    torch.testing.assert_close(prequential(TransformerLearner(8, 3, seed=0, **cfg), x, y, 1), half, rtol=0, atol=0)
    with pytest.raises(OCLError, match="stream0_weight"):
        TransformerLearner(8, 3, stream0_weight=0.0)


@pytest.mark.parametrize("B,C", [(2, 1), (4, 1), (4, 3)])
def test_stream0_weight_splits_the_loss_between_the_newest_chunk_and_the_replay_streams(B, C):
    """The step's loss is ``w0 * mean CE of stream 0 + (1 - w0) * mean over the replay streams of
    their mean CE``, for any number of streams B and chunk size C."""
    ce = torch.rand(B, C, generator=torch.Generator().manual_seed(B * 10 + C))
    expected = 0.3 * ce[0].mean() + 0.7 * ce[1:].mean(1).mean()
    torch.testing.assert_close((ce * stream_weights(B, C, 0.3)).sum(), expected)


# ----------------------------------------------------------------------- protocol details
@pytest.mark.parametrize("mode", MODES)
def test_eval_context_picks_which_caches_held_out_examples_attend_to(mode):
    """``eval_context``: ``stream0`` reads stream 0's cache, ``none`` no cache at all (the same as
    stream0 after that cache is emptied), ``replay`` the replay streams' caches only (stream 0's
    contents do not matter; theirs do). Every mode leaves the learner unchanged."""
    x, y = clusters(40)
    cfg = {**TINY, "replay_streams": 3, "label_mode": mode}
    learners = {m: TransformerLearner(8, 3, seed=0, **cfg, eval_context=m) for m in ("stream0", "none", "replay")}
    for learner in learners.values():
        prequential(learner, x, y, 1)
    xe = x[:7]
    out = {m: learner.evaluate(xe) for m, learner in learners.items()}
    torch.testing.assert_close(out["stream0"].exp().sum(1), torch.ones(7))
    torch.testing.assert_close(out["replay"].exp().sum(1), torch.ones(7))
    assert not torch.allclose(out["stream0"], out["none"]) and not torch.allclose(out["stream0"], out["replay"])
    for m, learner in learners.items():
        torch.testing.assert_close(learner.evaluate(xe), out[m], rtol=0, atol=0)  # stateless
    learners["stream0"].cache.reset(0)
    torch.testing.assert_close(learners["stream0"].evaluate(xe), out["none"], rtol=0, atol=1e-6)
    learners["replay"].cache.reset(0)
    torch.testing.assert_close(learners["replay"].evaluate(xe), out["replay"], rtol=0, atol=1e-6)
    learners["replay"].cache.reset(1)
    assert not torch.allclose(learners["replay"].evaluate(xe), out["replay"])
    with pytest.raises(OCLError, match="eval_context"):
        TransformerLearner(8, 3, eval_context="all")


@pytest.mark.parametrize("mode", MODES)
def test_first_prediction_uniform_and_evaluate_is_stateless(mode):
    K = 3
    x, y = clusters(20, classes=K)
    learner = TransformerLearner(8, K, seed=0, label_mode=mode, **TINY)
    torch.testing.assert_close(learner.predict(x[:2]), torch.full((2, K), -math.log(K)))
    prequential(learner, x[:15], y[:15], 1)
    state = (learner.cache.k.clone(), learner.cache.pos.clone(), learner.t, len(learner.history))
    ev = learner.evaluate(x[15:])
    assert torch.equal(learner.cache.k, state[0]) and torch.equal(learner.cache.pos, state[1])
    assert (learner.t, len(learner.history)) == state[2:]
    # each held-out example is scored as if it were the next one: equals a C=1 predict
    for i in range(15, 20):
        torch.testing.assert_close(ev[i - 15], learner.predict(x[i : i + 1])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ev.exp().sum(1), torch.ones(5))


@pytest.mark.parametrize("path", ["eager", "step_graphs"])
def test_non_finite_loss_skips_the_step_and_keeps_history_clean(path):
    """Eager, and through the CUDA-graph step functions run uncaptured (the skip is decided on the
    device there): no parameter moves, the chunk stays out of the history, learning goes on."""
    x, y = clusters(12)
    learner = TransformerLearner(8, 3, seed=0, **{**TINY, "replay_streams": 3})
    if path == "step_graphs":
        learner.graphs = StepGraphs(learner, capture=False)
    prequential(learner, x[:6], y[:6], 2)
    params = [p.clone() for p in learner.model.parameters()]
    bad = x[6:8].clone()
    bad[0, 0] = float("nan")
    learner.predict(bad)
    learner.update(bad, y[6:8])
    assert learner.skipped_updates == 1 and len(learner.history) == 6
    assert all(torch.equal(p, q) for p, q in zip(params, learner.model.parameters()))
    logp = prequential(learner, x[8:], y[8:], 2)
    assert torch.isfinite(logp).all() and learner.skipped_updates == 1


def test_qk_init_starts_queries_equal_to_keys_so_attention_prefers_similar_examples():
    """qk_init > 0: each layer's query and key weights start as the same N(0, qk_init^2) matrix, so
    q . k' is a random projection of h . h' and the first layer scores a near-copy of the query
    above unrelated examples; the default (0) keeps them independent and changes nothing else."""
    D, K, d = 24, 3, TransformerConfig().d_model
    torch.manual_seed(0)
    plain = OnlineTransformer(D, K, TransformerConfig())
    torch.manual_seed(0)
    tied = OnlineTransformer(D, K, TransformerConfig(qk_init=0.1))
    for a, b in zip(plain.blocks, tied.blocks):
        assert not torch.equal(a.qkv.weight[:d], a.qkv.weight[d:2 * d])
        assert torch.equal(b.qkv.weight[:d], b.qkv.weight[d:2 * d])
        assert 0.08 < float(b.qkv.weight[:d].detach().std()) < 0.12
        assert torch.equal(a.qkv.weight[2 * d:], b.qkv.weight[2 * d:])  # values, and all else, as before
    assert torch.equal(plain.in_proj.weight, tied.in_proj.weight)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, D, generator=g)
    others = torch.randn(20, D, generator=g)
    near = x + 0.05 * torch.randn(1, D, generator=g)
    for model, margin in ((tied, 5.0), (plain, None)):
        block = model.blocks[0]
        h = block.ln1(model.in_proj(model.in_ln(torch.cat([x, near, others]))))
        q, k, _ = block.qkv(h).split([d, d, d], dim=1)
        scores = (k[1:] @ q[0]).detach()  # (21,): the near-copy first
        if margin is not None:
            assert scores[0] > scores[1:].max() + margin
        else:  # untied and small: no preference worth the name
            assert abs(float(scores[0])) < 1.0


@pytest.mark.parametrize("layers, tied", [("first", [True, False]), ("last", [False, True])])
def test_qk_init_layers_ties_only_the_named_layer(layers, tied):
    """qk_init_layers: the first layer alone, or the last (whose attention the copy read-out
    reuses) alone; the other layers keep the default init, draw for draw."""
    d = TransformerConfig().d_model
    torch.manual_seed(0)
    plain = OnlineTransformer(12, 3, TransformerConfig())
    torch.manual_seed(0)
    model = OnlineTransformer(12, 3, TransformerConfig(qk_init=0.1, qk_init_layers=layers))
    assert [torch.equal(b.qkv.weight[:d], b.qkv.weight[d:2 * d]) for b in model.blocks] == tied
    for a, b, t in zip(plain.blocks, model.blocks, tied):
        assert torch.equal(a.qkv.weight, b.qkv.weight) != t


def test_bad_inputs_and_config_raise_ocl_errors():
    with pytest.raises(OCLError, match="unknown"):
        TransformerLearner(8, 3, windw=4)
    with pytest.raises(OCLError, match="label_mode"):
        TransformerLearner(8, 3, label_mode="tokens")
    with pytest.raises(OCLError, match="qk_init"):
        TransformerLearner(8, 3, qk_init=-0.1)
    with pytest.raises(OCLError, match="qk_init_layers"):
        TransformerLearner(8, 3, qk_init_layers="middle")
    learner = TransformerLearner(8, 3, **TINY)
    with pytest.raises(OCLError, match="shape"):
        learner.predict(torch.randn(2, 5))
    with pytest.raises(OCLError, match="labels"):
        learner.update(torch.randn(2, 8), torch.tensor([0, 3]))


def test_hydra_config_lists_every_option_with_its_default():
    path = Path(__file__).parents[3] / "configs" / "learner" / "transformer.yaml"
    conf = OmegaConf.to_container(OmegaConf.load(path))
    assert conf.pop("_target_") == "ocl.learners.transformer.TransformerLearner"
    assert conf.pop("_partial_") is True
    assert conf == {f.name: f.default for f in dataclasses.fields(TransformerConfig)}


# --------------------------------------------------------------------------- it learns
@pytest.mark.parametrize("mode", MODES)
def test_learns_gaussian_clusters_online(mode):
    n, K = 300, 4
    x, y = clusters(n, 16, K, seed=3, spread=1.0)
    learner = TransformerLearner(16, K, seed=0, label_mode=mode, d_model=32, window=16, replay_streams=2)
    logp = prequential(learner, x, y, 1)
    acc = (logp.argmax(1) == y).float()
    assert acc[n // 2 :].mean() > 0.8  # chance is 0.25
    assert F.nll_loss(logp[n // 2 :], y[n // 2 :]) < 0.6 * math.log(K)


@pytest.mark.slow
def test_context_recovers_from_label_permutations_that_weights_cannot_track():
    """Labels re-permuted every 100 examples: only in-context learning can keep up (weights
    see conflicting mappings). Emerges after ~1000 examples; W=16 then beats W=0 clearly
    (last quarter here: 0.80 vs 0.37; over six stream/learner seed pairs the gap was 0.14-0.44)."""
    n, seg, D, K = 1600, 100, 16, 4
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(K, D, generator=g) * 2
    c = torch.randint(0, K, (n,), generator=g)
    x, y = mu[c] + torch.randn(n, D, generator=g), c.clone()
    for s in range(0, n, seg):
        y[s : s + seg] = torch.randperm(K, generator=g)[c[s : s + seg]]
    acc = {}
    for W in (0, 16):
        learner = TransformerLearner(D, K, seed=0, d_model=64, lr=3e-3, lr_decay="constant", replay_streams=4,
                                     reset_rule="prob", window=W)
        logp = prequential(learner, x, y, 4)
        acc[W] = (logp.argmax(1) == y)[3 * n // 4 :].float().mean().item()
    assert acc[16] > acc[0] + 0.1, acc
