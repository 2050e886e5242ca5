import functools
import math

import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from ocl.errors import OCLError
from ocl.learners.checks import assert_log_probs, prequential
from ocl.learners.checks import clusters as make_clusters
from ocl.learners.slda import SLDALearner

D, K = 8, 4
clusters = functools.partial(make_clusters, dim=D, classes=K, spread=3.0)  # (n, D) features, (n,) labels


def test_slda_beats_chance_with_proper_log_probs():
    x, y = clusters(400)
    lp = prequential(SLDALearner(D, K), x, y, 1)
    assert_log_probs(lp)
    assert (lp.argmax(1) == y).float()[-200:].mean() > 0.8


@pytest.mark.parametrize("shrinkage", [0.0, 0.05, 0.5])
def test_matches_sklearn_lda_after_streaming(shrinkage):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    y = torch.randint(K, (300,), generator=g)
    x = x + 2 * torch.randn(K, D, generator=g, dtype=torch.float64)[y]  # overlapping classes
    slda = SLDALearner(D, K, shrinkage=shrinkage, priors=True, floor=1e-12, precision_dtype="float64")
    for s in range(0, 300, 13):  # uneven chunks
        slda.update(x[s : s + 13], y[s : s + 13])
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(x.numpy(), y.numpy())
    q = x[:50]
    torch.testing.assert_close(slda.scores(q), torch.from_numpy(sk.decision_function(q.numpy())), rtol=1e-6, atol=1e-6)
    ours = slda.predict(q.float()).double().exp()
    torch.testing.assert_close(ours, torch.from_numpy(sk.predict_proba(q.numpy())), rtol=1e-4, atol=1e-5)
    assert (ours.argmax(1).numpy() == sk.predict(q.numpy())).all()


def test_streamed_statistics_equal_batch_statistics():
    x, y = clusters(120)
    x = x.double()
    slda = SLDALearner(D, K)
    prequential(slda, x.float(), y, 1)
    centred = x - torch.stack([x[y == c].mean(0) for c in range(K)])[y]
    torch.testing.assert_close(slda.covariance, centred.T @ centred / 120, rtol=1e-4, atol=1e-5)


def test_deferred_scatter_updates_equal_immediate_ones():
    # The rank-(m+1) scatter updates are queued and applied at a precision refresh or after
    # MAX_PENDING_ROWS rows; predictions must equal those of applying each one at once.
    x, y = clusters(300, seed=3)
    eager = SLDALearner(D, K, refresh_every=7)
    eager.MAX_PENDING_ROWS = 1  # flush after every update
    lazy = SLDALearner(D, K, refresh_every=7)
    lazy.MAX_PENDING_ROWS = 40  # crossed mid-stream between refreshes
    for learner in (eager, lazy):
        learner.out = torch.cat([prequential(learner, x[:150], y[:150], 3), prequential(learner, x[150:], y[150:], 1)])
    assert not eager._pending and lazy._pending  # the lazy one still has rows queued
    torch.testing.assert_close(lazy.out, eager.out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lazy.covariance, eager.covariance, rtol=1e-12, atol=1e-12)
    assert not lazy._pending


def test_unseen_classes_get_the_floor_and_refresh_is_lazy():
    slda = SLDALearner(2, 3, floor=0.3, refresh_every=5)
    assert torch.allclose(slda.predict(torch.zeros(1, 2)), torch.full((1, 3), -math.log(3)))
    slda.update(torch.tensor([[0.0, 0.0], [1.0, 1.0], [4.0, 4.0]]), torch.tensor([0, 0, 2]))
    p = slda.predict(torch.tensor([[0.0, 0.0]])).exp()[0]
    assert p[1].item() == pytest.approx(0.1) and p[0] > p[2]
    first = slda._precision
    slda.update(torch.tensor([[5.0, 3.0]]), torch.tensor([2]))
    slda.predict(torch.zeros(1, 2))
    assert slda._precision is first  # 1 new example < refresh_every: precision reused
    slda.update(torch.randn(4, 2), torch.tensor([0, 2, 0, 2]))
    slda.predict(torch.zeros(1, 2))
    assert slda._precision is not first


def test_slda_is_label_blind_and_pure():
    x, y = clusters(60)
    y2 = y.clone()
    y2[20:30] = (y[20:30] + 1) % K
    a = prequential(SLDALearner(D, K), x, y, 10)
    b = prequential(SLDALearner(D, K), x, y2, 10)
    assert torch.equal(a[:30], b[:30]) and not torch.allclose(a[30:], b[30:])
    slda = SLDALearner(D, K)
    slda.update(x, y)
    assert torch.equal(slda.predict(x), slda.predict(x))



def test_refresh_every_auto_is_exact_for_narrow_features_and_amortised_for_wide():
    from ocl.learners.slda import SLDALearner

    assert SLDALearner(64, 3).refresh_every == 1
    assert SLDALearner(384, 3).refresh_every == 9
    assert SLDALearner(3072, 3).refresh_every == 576
    with pytest.raises(OCLError, match="refresh_every"):
        SLDALearner(8, 3, refresh_every="sometimes")


def test_float32_precision_predicts_like_float64():
    # The refresh factorises in float32 by default; on correlated, overlapping classes (a covariance
    # of condition number 4e6, 84 after shrinkage) its log-probs agree with float64's to 1e-4.
    g = torch.Generator().manual_seed(2)
    dim, classes = 96, 5
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -1.5, dim)  # uneven variances
    y = torch.randint(classes, (600,), generator=g)
    x = torch.randn(600, dim, generator=g) @ mix + torch.randn(classes, dim, generator=g)[y]
    out = {}
    for dtype in ("float32", "float64"):
        slda = SLDALearner(dim, classes, precision_dtype=dtype, refresh_every=4)
        out[dtype] = prequential(slda, x, y, 3)
        assert slda.precision().dtype == getattr(torch, dtype)
    torch.testing.assert_close(out["float32"], out["float64"], rtol=0, atol=1e-3)
    assert not torch.equal(out["float32"], out["float64"])  # it did compute in float32
    with pytest.raises(OCLError, match="precision_dtype"):
        SLDALearner(dim, classes, precision_dtype="half")


def test_a_frozen_copy_predicts_as_the_learner_did_and_never_learns():
    """``frozen()`` (the transformer's lagged held-out expert): the learner's predictions at the
    time of the copy, unchanged by what the learner learns after it, without the scatter."""
    x, y = make_clusters(60, dim=D, classes=K, seed=1, spread=0.5)  # overlapping: predictions not saturated
    learner = SLDALearner(D, K, refresh_every=7)
    learner.update(x[:25], y[:25])
    before = learner.predict(x)
    snap = learner.frozen()
    assert snap.scatter is None
    learner.update(x[25:], y[25:])
    assert not torch.allclose(learner.predict(x), before)
    torch.testing.assert_close(snap.predict(x), before, rtol=0, atol=0)
    with pytest.raises(OCLError, match="frozen"):
        snap.update(x[:2], y[:2])
