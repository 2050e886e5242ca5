"""``learner=pooled`` against the default learner as it was before the pool left the transformer.

Until commit 8178908 ``learner=transformer`` was the network, a linear read-out and SLDA in one
learner, pooled inside it. ``pooled_recorded.npz`` holds that learner's predictions, written by
the code of 8178908 with ``TransformerLearner(D, K, seed=3, **network_options, **pool_options)``
over the streams below (the pool's options then were the transformer's: ``pool``,
``heldout_scores``, ``heldout_lag``, ...). The pooled learner with the same experts must give:

- every online prediction (``predict`` of each chunk, logged before its update), in every case;
- ``evaluate`` of 4 held-out examples after every 10th chunk and of the 16 held-out examples at
  the end, in every case but ``lagged``: there the held-out pool's lagged SLDA used to be
  calibrated with SLDA's *current* temperature, and now its frozen copy carries the temperature
  it had when it was copied (the whole expert as it stood), so evaluate() differs on purpose.

(``heldout_skip`` stands for the network's window, which the old learner used as the skip.)
The tolerance is float rounding: the pool's Adam step was merged with the temperature's
(:class:`ocl.learners.common.Adam`); at the time of the split the difference was exactly 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ocl.learners.pooled import PooledLearner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RECORDED = Path(__file__).with_name("pooled_recorded.npz")
SMALL = dict(d_model=32, n_layers=2, n_heads=4, window=8, replay_streams=4, warmup=5)

#: name -> (D, K, examples n, chunk C, the network's options, the pool's options, evaluate compared)
CASES: dict[str, tuple[int, int, int, int, dict, dict, bool]] = {
    "default_C1": (48, 5, 120, 1, {}, {}, True),  # the defaults: d=128, W=64, R=8, mixed held-out scores
    "small_C1_mixed": (12, 4, 100, 1, SMALL, {"heldout_skip": 8}, True),
    "small_C3_past": (12, 4, 90, 3, SMALL, {"heldout_scores": "past", "heldout_skip": 8}, True),
    "small_C1_lagged": (12, 4, 90, 1, SMALL, {"heldout_scores": "lagged", "heldout_lag": 10}, False),
    "small_C1_fixed_share": (12, 4, 80, 1, SMALL, {"pool": "fixed_share", "heldout_mixture": False}, True),
}


def stream(D: int, K: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters, ``x (n + 16, D)`` (the last 16 are held out), ``y (n + 16,)``."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, D, generator=g) * 1.5
    y = torch.randint(0, K, (n + 16,), generator=g)
    return mu[y] + torch.randn(n + 16, D, generator=g), y


@pytest.mark.parametrize("case", list(CASES))
def test_pooled_predicts_what_the_transformer_with_read_outs_predicted(case):
    D, K, n, C, network, pool, compare_evaluate = CASES[case]
    x, y = stream(D, K, n)
    # the network as it was then: without the copy read-out, its replay streams of then (R = 8) and
    # with every stream weighing the same in the loss
    then = {"copy": False, "replay_streams": 8, "lr": 1e-3, "stream0_weight": None, **network}
    learner = PooledLearner(D, K, seed=3, experts=[{"name": "transformer", **then}, "linear", "slda"], **pool)
    logged, along = [], []
    for s in range(0, n, C):
        logged.append(learner.predict(x[s : s + C]))
        learner.update(x[s : s + C], y[s : s + C])
        if (s // C) % 10 == 9:
            along.append(learner.evaluate(x[n : n + 4]))
    rec = np.load(RECORDED)
    np.testing.assert_allclose(torch.cat(logged).numpy(), rec[f"{case}/logged"], rtol=0, atol=2e-5)
    if compare_evaluate:
        np.testing.assert_allclose(torch.stack(along).numpy(), rec[f"{case}/evaluate_along"], rtol=0, atol=2e-5)
        np.testing.assert_allclose(learner.evaluate(x[n:]).numpy(), rec[f"{case}/evaluate"], rtol=0, atol=2e-5)
    assert np.abs(rec[f"{case}/logged"] - rec[f"{case}/logged"][:1]).max() > 0.5  # it learned something
