"""The Avalanche adapter runs Avalanche's own strategies prequentially."""

import functools

import pytest
import torch

pytest.importorskip("avalanche")

from ocl.errors import OCLError  # noqa: E402
from ocl.learners.avalanche import STRATEGIES, AvalancheLearner, make_experience  # noqa: E402
from ocl.learners.checks import clusters as make_clusters  # noqa: E402
from ocl.learners.checks import prequential  # noqa: E402

D, K = 8, 4
clusters = functools.partial(make_clusters, dim=D, classes=K, spread=3.0)  # (n, D) features, (n,) labels
# Small, fast settings per strategy (GDumb retrains from scratch on its memory each time).
FAST = {
    "naive": {},
    "replay": {"mem_size": 40},
    "er_ace": {"mem_size": 40},
    "gdumb": {"mem_size": 40, "train_mb_size": 16, "train_epochs": 3},
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_beats_chance_with_proper_log_probs(strategy):
    x, y = clusters(200)
    learner = AvalancheLearner(D, K, seed=0, strategy=strategy, experience_size=5, **FAST[strategy])
    lp = prequential(learner, x, y, 5)
    assert torch.isfinite(lp).all() and lp.dtype == torch.float32
    torch.testing.assert_close(lp.logsumexp(1), torch.zeros(200), atol=1e-5, rtol=0)
    assert (lp.argmax(1) == y).float()[-100:].mean() > 0.7  # chance is 0.25
    assert learner._n_experiences == 40  # one Avalanche experience per 5 revealed examples


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunk_is_scored_before_the_strategy_sees_its_labels(strategy):
    x, y = clusters(40, seed=1)
    y2 = y.clone()
    y2[15:20] = (y[15:20] + 1) % K  # relabel chunk 3 only

    def run(labels):
        learner = AvalancheLearner(D, K, seed=4, strategy=strategy, experience_size=5, **FAST[strategy])
        return prequential(learner, x, labels, 5)

    a, a2, b = run(y), run(y), run(y2)
    assert torch.equal(a, a2)  # seeded: Avalanche's shuffling and buffers run on our RNG stream
    assert torch.equal(a[:20], b[:20])  # chunk 3's predictions did not see its labels
    assert not torch.allclose(a[20:], b[20:])  # ... which the strategy then trained on


def test_experience_size_batches_chunks_and_predict_is_pure():
    x, y = clusters(23)
    learner = AvalancheLearner(D, K, seed=0, strategy="naive", experience_size=10)
    before = learner.predict(x)
    for s in range(0, 9):  # 9 examples revealed: not yet an experience
        learner.update(x[s : s + 1], y[s : s + 1])
    assert learner._n_experiences == 0 and torch.equal(learner.predict(x), before)
    learner.update(x[9:10], y[9:10])
    assert learner._n_experiences == 1 and not torch.equal(learner.predict(x), before)
    learner.update(x[10:13], y[10:13])
    learner.on_task_boundary(1)  # a task boundary hands over what is pending
    assert learner._n_experiences == 2
    assert torch.equal(learner.evaluate(x), learner.predict(x))


def test_global_rng_untouched_and_replay_storage_options():
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer

    x, y = clusters(20)
    for storage, kind in [("reservoir", ReservoirSamplingBuffer), ("experience_balanced", ExperienceBalancedBuffer)]:
        learner = AvalancheLearner(D, K, strategy="replay", mem_size=8, experience_size=5, replay_storage=storage)
        state = torch.get_rng_state()
        prequential(learner, x, y, 5)
        assert torch.equal(torch.get_rng_state(), state)
        plugin = next(p for p in learner.strategy.plugins if isinstance(p, ReplayPlugin))
        assert isinstance(plugin.storage_policy, kind) and len(plugin.storage_policy.buffer) == 8
    with pytest.raises(OCLError):
        AvalancheLearner(D, K, strategy="ewc")


def test_make_experience_yields_task_zero_triples():
    x, y = clusters(6)
    exp = make_experience(x, y, 3)
    assert exp.current_experience == 3 and len(exp.dataset) == 6
    xi, yi, ti = exp.dataset[4]
    assert torch.equal(xi, x[4]) and int(yi) == int(y[4]) and ti == 0
    assert list(exp.dataset.targets) == y.tolist()



@pytest.mark.parametrize("strategy", ["replay", "er_ace", "gdumb"])
def test_memory_compaction_changes_no_prediction(strategy):
    x, y = clusters(300, seed=2)
    kw = dict(seed=3, strategy=strategy, experience_size=5, **FAST[strategy])
    lazy = prequential(AvalancheLearner(D, K, compact_every=0, **kw), x, y, 5)
    compact = prequential(AvalancheLearner(D, K, compact_every=1, **kw), x, y, 5)
    assert torch.equal(lazy, compact)  # same memory, same order, same random draws


def _live_tensor_datasets() -> int:
    import gc

    from torch.utils.data import TensorDataset

    gc.collect()
    return sum(type(o) is TensorDataset for o in gc.get_objects())


@pytest.mark.parametrize("strategy", ["replay", "er_ace"])
def test_memory_compaction_releases_old_experiences(strategy):
    # Avalanche's lazy reservoir views keep every experience ever concatenated alive (and
    # each buffer update pays for all of them); compaction keeps that bounded.
    x, y = clusters(400, seed=5)
    grown = {}
    for every in (0, 8):
        before = _live_tensor_datasets()
        learner = AvalancheLearner(D, K, seed=0, strategy=strategy, experience_size=5, compact_every=every,
                                   **FAST[strategy])
        prequential(learner, x, y, 5)  # 80 experiences
        grown[every] = _live_tensor_datasets() - before
        del learner
    assert grown[0] >= 60  # the lazy views hold (nearly) every experience
    assert grown[8] <= 20  # at most the experiences since the last compaction, + the compacted memory
    with pytest.raises(OCLError, match="compact_every"):
        AvalancheLearner(D, K, strategy="replay", compact_every=-1)
