import pickle

import pytest
import torch

from ocl.errors import OCLError
from ocl.learners.checks import assert_log_probs, clusters, prequential
from ocl.learners.ranpac import PAPER_LAMBDAS, RanPACLearner
from ocl.learners.ridge import StreamingRidge

M, K = 12, 3


def rows(n, seed=0):
    """Nonnegative features (as ReLU ones are) ``(n, M)`` float32 and labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(K, (n,), generator=g)
    h = torch.relu(torch.randn(n, M, generator=g) + torch.randn(K, M, generator=g)[y])
    return h, y


def batch_ridge(h, y, lam):
    """``(M, K)`` ridge weights of one-hot ``y`` on ``h``, solved directly in float64."""
    h = h.double()
    onehot = torch.nn.functional.one_hot(y, K).double()
    return torch.linalg.solve(h.T @ h + lam * torch.eye(h.shape[1], dtype=torch.float64), h.T @ onehot)


@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("dtype, tol, atol", [("float64", 1e-9, 1e-10), ("float32", 1e-3, 1e-3)])
def test_ridge_equals_batch_ridge_after_every_prefix(chunk, dtype, tol, atol):
    h, y = rows(95)
    q, _ = rows(9, seed=1)  # > 2 K rows: logits through the weights; keep=True: through the Woodbury rows
    ridge = StreamingRidge(M, K, [0.01, 1.0, 100.0], 2, refresh_every=32, first_refresh=2, precision_dtype=dtype)
    refreshes = early_changes = 0
    for s in range(0, 95, chunk):
        before, index = ridge.n0, ridge.index
        ridge.update(h[s : s + chunk], y[s : s + chunk])
        refreshes += ridge.n0 != before
        early_changes += ridge.index != index and not ridge.n0
        w = batch_ridge(h[: s + chunk], y[: s + chunk], ridge.lam)
        torch.testing.assert_close(ridge.weights(), w, rtol=tol, atol=atol)
        torch.testing.assert_close(ridge.logits(q), q.double() @ w, rtol=tol, atol=atol)
        torch.testing.assert_close(ridge.logits(q, keep=True), q.double() @ w, rtol=tol, atol=atol)
    # the Woodbury rows, several eigendecompositions and a lambda changed before the first one all exercised
    assert refreshes >= 2 and 0 < ridge.r and early_changes


def test_ridge_reuses_its_prediction_work_exactly():
    h, y = rows(60)
    kept, fresh = (StreamingRidge(M, K, [0.1, 10.0], 0, refresh_every=8, first_refresh=2) for _ in range(2))
    for s in range(0, 60, 3):
        kept.logits(h[s : s + 3], keep=True)
        kept.update(h[s : s + 3], y[s : s + 3])
        fresh.update(h[s : s + 3].clone(), y[s : s + 3])
    torch.testing.assert_close(kept.weights(), fresh.weights(), rtol=1e-12, atol=1e-12)


def test_lambda_is_chosen_by_blockwise_prequential_accuracy():
    # choices after 4 and 8 rows (in kernel form), then a refresh every 16: each lambda's votes are
    # the rows of each block that batch ridge on the rows before the block, with that lambda,
    # classifies right
    h, y = rows(48, seed=2)
    grid = [1e-3, 1.0, 1e3, 1e6]
    ridge = StreamingRidge(M, K, grid, 0, refresh_every=16, first_refresh=4)
    for s in range(0, 48, 2):
        ridge.update(h[s : s + 2], y[s : s + 2])
    hits = torch.zeros(len(grid), dtype=torch.float64)
    bounds = [4, 8, 16, 32, 48]
    for start, end in zip(bounds, bounds[1:]):
        seen = torch.bincount(y[:start], minlength=K) > 0
        for i, lam in enumerate(grid):
            scores = (h[start:end].double() @ batch_ridge(h[:start], y[:start], lam))[:, seen]
            truth = (torch.cumsum(seen, 0) - 1)[y[start:end]]
            hits[i] += ((scores.argmax(1) == truth) & seen[y[start:end]]).sum()
    torch.testing.assert_close(ridge.hits, hits)
    assert hits[ridge.index] == hits.max()
    assert len(set(hits.tolist())) > 1  # the grid really differs on this stream


def test_lambda_ties_keep_the_current_one_or_the_nearest():
    ridge = StreamingRidge(M, K, [1e-3, 1.0, 1e3, 1e6], 1, refresh_every=8)
    seen, y = torch.ones(K, dtype=torch.bool), torch.tensor([0, 1])
    right, wrong = torch.tensor([[9.0, 0, 0], [0, 9.0, 0]]), torch.tensor([[0, 0, 9.0], [0, 0, 9.0]])
    ridge._vote(torch.stack([right] * 4), y, seen)  # all tie: the current stays
    assert ridge.index == 1
    ridge._vote(torch.stack([wrong, wrong, right, right]), y, seen)  # 2 and 3 best: the nearer to 1
    assert ridge.index == 2 and ridge.hits.tolist() == [2, 2, 4, 4]


def test_lambda_choice_never_sees_labels_not_yet_learned():
    h, y = rows(80, seed=3)
    other = y.clone()
    other[40:] = (y[40:] + 1) % K
    chosen = []
    for labels in (y, other):
        ridge = StreamingRidge(M, K, [1e-3, 1.0, 1e3], 2, refresh_every=8, first_refresh=4)
        trace = []
        for s in range(0, 80, 4):
            ridge.update(h[s : s + 4], labels[s : s + 4])
            trace.append((ridge.index, ridge.hits.clone()))
        chosen.append(trace)
    for (ia, ha), (ib, hb) in list(zip(*chosen))[:10]:  # up to example 40, identical
        assert ia == ib and torch.equal(ha, hb)


def test_ridge_pickles_its_filled_buffers_only_and_resumes_exactly():
    h, y = rows(50)
    ridge = StreamingRidge(M, K, [0.1, 10.0], 0, refresh_every=8, first_refresh=4)  # buffers of 8 < M rows
    ridge.update(h[:30], y[:30])
    assert 0 < ridge.r < 8
    state = ridge.__getstate__()
    assert state["_z"].shape == (ridge.r, M) and state["_linv"].shape == (ridge.r, ridge.r)
    copy = pickle.loads(pickle.dumps(ridge))
    for r in (ridge, copy):
        r.update(h[30:], y[30:])
    torch.testing.assert_close(copy.weights(), ridge.weights(), rtol=0, atol=0)


def test_ranpac_scores_are_ridge_on_relu_random_features():
    x, y = clusters(60, dim=6, classes=K)
    learner = RanPACLearner(6, K, seed=3, dim=32, first_refresh=8, refresh_every=16, precision_dtype="float64")
    lp = prequential(learner, x, y, 5)
    assert_log_probs(lp, 60, K)
    h = torch.cat([learner.features(x[s : s + 5]) for s in range(0, 60, 5)])  # as the learner mapped them
    torch.testing.assert_close(h, torch.relu(x @ learner.features.weight), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(learner.ridge.weights(), batch_ridge(h, y, learner.ridge.lam), rtol=1e-8, atol=1e-9)
    assert (lp[30:].argmax(1) == y[30:]).float().mean() > 0.8
    assert learner.temperature.steps == 11  # every chunk but the first (no class seen when it was scored)


def test_ranpac_seed_draws_the_projection():
    a, b, c = (RanPACLearner(6, K, seed=s, dim=8) for s in (1, 1, 2))
    assert torch.equal(a.features.weight, b.features.weight) and not torch.equal(a.features.weight, c.features.weight)


def test_ranpac_defaults_are_the_papers_grid():
    learner = RanPACLearner(4, K)
    assert learner.ridge.lambdas.tolist() == list(PAPER_LAMBDAS) and PAPER_LAMBDAS[0] == 1e-8 and len(PAPER_LAMBDAS) == 22
    assert learner.ridge.refresh_every == 2048 and learner.ridge.lam == 1.0 and learner.ridge.dtype == torch.float32


@pytest.mark.parametrize("bad", [dict(lambdas=[]), dict(lambdas=[0.0, 1.0]), dict(initial_lambda=3.0),
                                 dict(refresh_every=0), dict(refresh_every="often"), dict(first_refresh=0),
                                 dict(dim=0), dict(precision_dtype="half"), dict(floor=0.0), dict(temp_lr=-1.0), dict(temp_init=0.0)])
def test_ranpac_refuses_bad_options(bad):
    options = dict(lambdas=[1.0], initial_lambda=1.0) if "lambdas" not in bad else dict(initial_lambda=1.0)
    with pytest.raises(OCLError):
        RanPACLearner(4, K, **{**options, **bad})


def test_float32_too_coarse_for_a_tiny_lambda_goes_on_in_float64(caplog):
    # nearly collinear rows and lambda 1e-8: float32 rounding breaks the Woodbury system's
    # positive definiteness; the ridge switches to float64 and stays exact
    g = torch.Generator().manual_seed(0)
    h = (torch.relu(torch.randn(1, 64, generator=g)) + 1e-3 * torch.randn(300, 64, generator=g)).abs()
    y = torch.randint(K, (300,), generator=g)
    ridge = StreamingRidge(64, K, [1e-8], 0, refresh_every=128, first_refresh=8, precision_dtype="float32")
    for s in range(300):
        ridge.update(h[s : s + 1], y[s : s + 1])
    assert ridge.dtype == torch.float64 and "continuing in float64" in caplog.text
    torch.testing.assert_close(ridge.weights(), batch_ridge(h, y, 1e-8), rtol=1e-6, atol=1e-5)
