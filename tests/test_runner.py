import numpy as np
import pytest
import torch

from ocl.build import available_learners, learner_config, make_learner, seed_everything
from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.tracker import NearFutureTracker
from ocl.runner import iter_chunks, run_stream
from ocl.streams.base import ArrayImageSet, Source
from ocl.streams.protocols import bursty, split


class Memorizer(Learner):
    """Predicts the label it was last *given* for an identical x; uniform otherwise.

    If the runner ever let ``update`` run before ``predict`` (or leaked labels into
    predict), first sightings would be predicted perfectly.
    """

    name = "memorizer"

    def __init__(self, num_classes):
        self.K = num_classes
        self.table = {}
        self.calls = []
        self.boundaries = []

    def predict(self, x):
        self.calls.append(("predict", x.shape[0]))
        out = torch.full((x.shape[0], self.K), -30.0)
        for i, row in enumerate(x):
            k = self.table.get(tuple(row.tolist()))
            if k is None:
                out[i] = 0.0
            else:
                out[i, k] = 0.0
        return torch.log_softmax(out, 1)

    def evaluate(self, x):
        calls = list(self.calls)
        out = self.predict(x)
        self.calls = calls  # held-out evaluation is not part of the predict/update sequence
        return out

    def update(self, x, y):
        self.calls.append(("update", x.shape[0]))
        for row, k in zip(x, y):
            self.table[tuple(row.tolist())] = int(k)

    def on_task_boundary(self, task):
        self.boundaries.append(task)


def unique_source(K=4, n_per_class=10):
    y = np.repeat(np.arange(K), n_per_class)
    x = np.arange(y.size * 2, dtype=np.float32).reshape(-1, 2)  # every example distinct
    return Source("u", ArrayImageSet(x, y), ArrayImageSet(x[:8], y[:8]), [str(k) for k in range(K)])


@pytest.mark.parametrize("C", [1, 3, 7])
def test_runner_scores_before_update(C):
    src = unique_source()
    stream = split(src, seed=0, n_tasks=2)
    feats = src.train.data
    learner = Memorizer(4)
    res = run_stream(learner, feats, stream, chunk_size=C, test_feats=src.test.data, progress=False)
    # every example is new when predicted, so nothing can be right except by the tie-break
    assert res.tracker.t == len(stream)
    np.testing.assert_allclose(res.tracker.loss, np.log(4), rtol=1e-5)
    # strictly alternating predict/update on identical chunk sizes
    kinds = [k for k, _ in learner.calls]
    assert kinds == ["predict", "update"] * (len(kinds) // 2)
    assert learner.boundaries == [1]
    # the test examples were trained on (they are train rows 0..7), so the matrix shows memory
    assert res.acc.shape == (2, 2)


def test_runner_replayed_stream_is_remembered():
    # the same examples twice: the second pass must be perfect, the first at chance
    src = unique_source()
    stream = split(src, seed=0, n_tasks=1, classes_per_task=4)
    stream.order = np.concatenate([stream.order, stream.order])
    stream.labels = np.concatenate([stream.labels, stream.labels])
    stream.tasks = np.zeros(stream.order.size, dtype=np.int64)
    res = run_stream(Memorizer(4), src.train.data, stream, chunk_size=5, progress=False)
    n = len(src.train)
    assert res.tracker.correct[n:].all()
    np.testing.assert_allclose(res.tracker.loss[n:], 0, atol=1e-6)


def test_chunks_never_straddle_task_boundaries():
    ch = list(iter_chunks(10, 4, np.array([3, 7])))
    assert ch == [(0, 3), (3, 7), (7, 10)]
    assert list(iter_chunks(5, 2, np.array([], dtype=int))) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(OCLError):
        run_stream(Memorizer(4), unique_source().train.data, split(unique_source(), n_tasks=1, classes_per_task=4), 0)


def test_chunks_resume_from_any_chunk_start():
    full = list(iter_chunks(23, 4, np.array([5, 13])))
    for i, (s, _) in enumerate(full):
        assert list(iter_chunks(23, 4, np.array([5, 13]), s)) == full[i:]
    with pytest.raises(ValueError):
        list(iter_chunks(23, 4, np.array([5, 13]), 7))  # 7 is mid-chunk


# ---------------------------------------------------------------- near-future accuracy


class Recorder(Memorizer):
    """A Memorizer that logs which examples ``evaluate`` was shown (features = [2i, 2i+1] for
    training example i) and after how many updates."""

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.evaluated = []  # (examples learned so far, training example shown)

    def evaluate(self, x):
        learned = sum(c for k, c in self.calls if k == "update")
        self.evaluated += [(learned, int(row[0]) // 2) for row in x]
        return super().evaluate(x)


def test_near_future_evaluates_the_unseen_input_of_step_end_plus_S():
    """Hand-computed: 40 steps, tasks at 20; chunks of 3 never straddle the boundary."""
    src = unique_source(K=4, n_per_class=10)
    stream = split(src, seed=0, n_tasks=2)
    assert stream.boundaries().tolist() == [20]
    learner = Recorder(4)
    res = run_stream(learner, src.train.data, stream, chunk_size=3, progress=False,
                     near_future=NearFutureTracker(offset=4, every=5))
    # chunks [0,3) [3,6) [6,9) [9,12) [12,15) [15,18) [18,20) | [20,23) [23,26) ... [35,38) [38,40);
    # an evaluation follows each chunk holding a step t with (t+1) % 5 == 0, on step end + 4
    ends = [6, 12, 15, 20, 26, 32, 35, 40]
    targets = [e + 4 for e in ends if e + 4 < 40]
    assert res.near_future.records["target"].tolist() == targets == [10, 16, 19, 24, 30, 36, 39]
    assert res.near_future.records["step"].tolist() == [t - 5 for t in targets]  # the last step learned
    # the learner had learned exactly the steps before `end`, and was shown the target's input
    assert learner.evaluated == [(t - 4, int(stream.order[t])) for t in targets]
    np.testing.assert_array_equal(res.near_future.records["label"], stream.labels[targets])
    # never seen, so the memorizer is at chance: uniform log-probabilities
    np.testing.assert_allclose(res.near_future.records["loss"], np.log(4), rtol=1e-6)
    kinds = [k for k, _ in learner.calls]
    assert kinds == ["predict", "update"] * (len(kinds) // 2)  # evaluation is not part of the sequence


def test_near_future_with_S0_scores_what_online_accuracy_scores():
    """With S = 0 and every step, the learner after step t scores x_{t+1}: for a learner whose
    evaluate is its predict, the very prediction online accuracy scores at step t+1."""
    from ocl.learners.linear import LinearLearner

    src = unique_source(K=4, n_per_class=25)
    src.train.data[:] = np.random.default_rng(0).normal(size=src.train.data.shape) + src.train.labels[:, None]
    stream = split(src, seed=0, n_tasks=1, classes_per_task=4)
    res = run_stream(LinearLearner(2, 4), src.train.data, stream, progress=False,
                     near_future=NearFutureTracker(offset=0, every=1))
    r = res.near_future.records
    assert r["target"].tolist() == list(range(1, 100))
    np.testing.assert_array_equal(r["pred"], res.tracker.pred[1:])
    np.testing.assert_allclose(r["loss"], res.tracker.loss[1:], rtol=1e-6)


def blobs_source(K=10, n_per_class=300, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), n_per_class)
    centers = rng.normal(size=(K, dim)) * 4
    x = (centers[y] + rng.normal(size=(y.size, dim))).astype(np.float32)
    return Source("blobs", ArrayImageSet(x, y), None, [str(k) for k in range(K)])


def test_blind_learner_is_high_online_and_at_chance_near_future_on_long_runs():
    """The paper's point: on a stream whose labels come in long runs (mean 100), a blind
    predictor of the last labels scores high online accuracy, and near-future accuracy with
    S well past a run exposes it; a learner that uses the inputs keeps its accuracy."""
    from ocl.learners.ncm import NCMLearner
    from ocl.learners.recent import RecentLabelsLearner

    src = blobs_source()
    stream = bursty(src, seed=0, stay=0.99)  # 3,000 steps, K = 10: chance 0.1
    nf = {"offset": 500, "every": 5}
    blind = run_stream(RecentLabelsLearner(8, 10, window=5), src.train.data, stream, progress=False,
                       near_future=NearFutureTracker(**nf))
    seeing = run_stream(NCMLearner(8, 10), src.train.data, stream, progress=False, near_future=NearFutureTracker(**nf))
    b, s = blind.near_future.summary(), seeing.near_future.summary()
    print(f"recent: online {blind.tracker.summary()['avg_online_accuracy']:.3f}, near-future "
          f"{b['near_future_accuracy']:.3f}; ncm: online {seeing.tracker.summary()['avg_online_accuracy']:.3f}, "
          f"near-future {s['near_future_accuracy']:.3f} ({b['near_future_evaluations']} evaluations)")
    assert b["near_future_evaluations"] == 499  # after steps 4, 9, ..., 2494: targets 505 ... 2995
    assert blind.tracker.summary()["avg_online_accuracy"] > 0.9
    assert b["near_future_accuracy"] < 0.2  # chance is 0.1; the blind shortcut no longer pays
    r = seeing.near_future.records
    late = r["step"] >= 1500  # by then it has seen every class (early targets are often of unseen ones)
    assert len(set(stream.labels[:1500].tolist())) == 10
    print(f"ncm near-future accuracy from step 1500 on: {np.mean(r['pred'][late] == r['label'][late]):.3f}")
    assert s["near_future_accuracy"] > 0.6 and np.mean(r["pred"][late] == r["label"][late]) > 0.95


LEARNER_OPTIONS = {  # tiny and fast; every shipped learner config, with its own defaults otherwise
    "transformer": {"d_model": 16, "window": 4, "replay_streams": 2},
    "pooled": {"experts": [{"name": "transformer", "d_model": 16, "window": 4, "replay_streams": 2}, "linear", "slda"]},
    "avalanche_gdumb": {"experience_size": 20, "train_epochs": 2},
    "knn": {"memory_size": 50},
    "slda": {"refresh_every": 7},  # its precision is refreshed lazily: evaluations fall between refreshes
}


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("name", sorted(set(available_learners())))
def test_near_future_evaluation_never_changes_what_a_learner_predicts(name, chunk_size):
    """With near-future evaluation after every chunk, every per-step prediction and loss and the
    accuracy matrix are bit-identical to a run without it: ``evaluate`` changes no state."""

    src = blobs_source(K=4, n_per_class=30, dim=6)
    src = Source("blobs", src.train, ArrayImageSet(src.train.data[::7], src.train.labels[::7]), src.classes)
    stream = bursty(src, seed=1, stay=0.8)  # 120 steps

    def run(near_future):
        seed_everything(0)  # the learners' construction and the global RNGs, as a run sets them
        learner = make_learner(learner_config(name, LEARNER_OPTIONS.get(name)), 6, 4, seed=0)
        return run_stream(learner, src.train.data, stream, chunk_size=chunk_size, test_feats=src.test.data,
                          progress=False, near_future=near_future)

    off, on = run(None), run(NearFutureTracker(offset=2, every=1))
    assert on.near_future.n == sum(1 for end in range(chunk_size, 121, chunk_size) if end + 2 < 120)
    np.testing.assert_array_equal(on.tracker.pred, off.tracker.pred)
    np.testing.assert_array_equal(on.tracker.loss, off.tracker.loss)
    np.testing.assert_array_equal(on.acc, off.acc)


def test_a_float16_feature_cache_reaches_the_learner_as_float32(tmp_path):
    # cache_dtype=float16 stores half-size features; training rows and test rows are read back as float32
    src = unique_source()
    stream = split(src, seed=0, n_tasks=2)
    half = {}
    for name, x in (("train", src.train.data), ("test", src.test.data)):
        np.save(tmp_path / f"{name}.npy", x.astype(np.float16))
        half[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")  # what the cache returns

    class Float32Only(Memorizer):
        def predict(self, x):
            assert x.dtype == torch.float32
            return super().predict(x)

    learner = Float32Only(4)
    res = run_stream(learner, half["train"], stream, chunk_size=3, test_feats=half["test"], progress=False)
    ref = run_stream(Memorizer(4), src.train.data, stream, chunk_size=3, test_feats=src.test.data, progress=False)
    np.testing.assert_array_equal(res.tracker.loss, ref.tracker.loss)  # these features are exact in float16
    np.testing.assert_array_equal(res.acc, ref.acc)


def test_tasks_that_share_test_images_are_predicted_once_and_scored_per_task():
    """A permuted stream's tasks are the same test images under other label mappings: one
    evaluate pass per boundary, not one per task, with the accuracies of a pass per task."""
    from ocl.runner import evaluate_tasks
    from ocl.streams.protocols import permuted

    src = unique_source(K=4, n_per_class=10)
    stream = permuted(src, seed=3, segment_length=10)
    assert len(stream.tests) == 4
    learner = Memorizer(4)
    for row, y in zip(src.train.data[:8], src.train.labels[:8]):  # knows the test images' true classes
        learner.update(torch.from_numpy(row[None]), torch.tensor([y]))
    seen = []
    real = learner.evaluate
    learner.evaluate = lambda x: seen.append(len(x)) or real(x)
    accs = evaluate_tasks(learner, src.test.data, stream, batch_size=3)
    assert seen == [3, 3, 2]  # 8 test images, once
    pred = real(torch.from_numpy(src.test.data)).argmax(1).numpy()
    expected = [(pred == tt.labels).mean() for tt in stream.tests]  # one pass per task
    np.testing.assert_array_equal(accs, expected)
    assert len(set(accs.tolist())) > 1  # the mappings differ, and so do the scores
