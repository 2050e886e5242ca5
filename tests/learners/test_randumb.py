import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from ocl.errors import OCLError
from ocl.learners.checks import assert_log_probs, clusters, prequential
from ocl.learners.random_features import RandomFeatures
from ocl.learners.randumb import RanDumbLearner

D, K = 6, 3


def test_fourier_features_approximate_the_rbf_kernel_of_normalised_inputs():
    x = torch.randn(20, D, dtype=torch.float64)
    for gamma in (0.5, 2.0):
        rff = RandomFeatures(D, 20000, seed=0, kind="fourier", gamma=gamma, normalize=True)
        h = rff(x).double()
        u = F.normalize(x, dim=1)
        kernel = torch.exp(-gamma * torch.cdist(u, u).square())
        assert float((h @ h.T - kernel).abs().max()) < 0.05
        assert float(kernel.min()) < 0.5  # the kernel is not trivially ~1 on these inputs


@pytest.mark.parametrize("shrinkage", [0.01, 0.3])
def test_randumb_equals_batch_lda_on_its_features(shrinkage):
    x, y = clusters(150, dim=D, classes=K, spread=1.0)
    learner = RanDumbLearner(D, K, seed=2, dim=24, shrinkage=shrinkage, refresh_every=1, precision_dtype="float64")
    lp = prequential(learner, x, y, 1)
    assert_log_probs(lp, 150, K)
    h = torch.cat([learner.features(x[i : i + 1]) for i in range(150)]).double()  # as the learner mapped them
    # scikit-learn weights the class covariances by its priors: the empirical ones give the pooled
    # within-class covariance (SLDA's); RanDumb's equal priors are its log-priors taken off again
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(h.numpy(), y.numpy())
    theirs = torch.from_numpy(sk.decision_function(h.numpy())) - torch.from_numpy(sk.priors_).log()
    torch.testing.assert_close(learner.lda.scores(h), theirs, rtol=1e-6, atol=1e-6)
    assert (lp[75:].argmax(1) == y[75:]).float().mean() > 0.8


def test_randumb_chunked_equals_one_by_one():
    # the class means and covariance are exact whatever the chunking; so are the scores with
    # refresh_every=1 (the temperature steps once per chunk, so it differs: compared raw)
    x, y = clusters(80, dim=D, classes=K)
    q, _ = clusters(10, dim=D, classes=K, seed=1)
    raw = []
    for chunk in (1, 7):
        learner = RanDumbLearner(D, K, seed=0, dim=16, refresh_every=1, precision_dtype="float64")
        prequential(learner, x, y, chunk)
        raw.append(learner.lda.scores(learner.features(q)))
    # float32 features of a chunk of 1 and of 7 differ in the last bit (different matmul kernels)
    torch.testing.assert_close(raw[0], raw[1], rtol=1e-5, atol=1e-4)


def test_randumb_temperature_steps_on_scored_chunks_only():
    x, y = clusters(40, dim=D, classes=K, spread=0.5)  # overlapping: mistakes to calibrate on
    learner = RanDumbLearner(D, K, dim=16, temp_lr=0.1)
    prequential(learner, x, y, 4)
    assert learner.temperature.steps == 9 and learner.temperature.log_scale != 0.0  # all but the first chunk
    fixed = RanDumbLearner(D, K, dim=16, temp_lr=0.0, temp_init=2.0)
    prequential(fixed, x, y, 4)
    assert fixed.temperature.scale == pytest.approx(2.0)


def test_randumb_defaults():
    learner = RanDumbLearner(D, K)
    assert learner.features.dim == 2048 and learner.features.normalize and learner.lda.shrinkage == 0.1
    assert learner.lda.refresh_every == math.ceil(2048**2 / 2**14) and not learner.lda.priors


@pytest.mark.parametrize("bad", [dict(dim=0), dict(gamma=0.0), dict(shrinkage=1.5), dict(refresh_every=0),
                                 dict(precision_dtype="float16"), dict(floor=1.0), dict(temp_init=-1.0)])
def test_randumb_refuses_bad_options(bad):
    with pytest.raises(OCLError):
        RanDumbLearner(D, K, **bad)


def test_random_features_refuse_an_unknown_kind():
    with pytest.raises(OCLError):
        RandomFeatures(D, 8, seed=0, kind="laplace")
