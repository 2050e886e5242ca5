import numpy as np
import pytest
import torch

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.runner import _chunks, _iter_chunks, run_stream
from ocl.streams.base import ArrayImageSet, Source
from ocl.streams.protocols import split


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
    ch = _chunks(10, 4, np.array([3, 7]))
    assert ch == [(0, 3), (3, 7), (7, 10)]
    assert _chunks(5, 2, np.array([], dtype=int)) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(OCLError):
        run_stream(Memorizer(4), unique_source().train.data, split(unique_source(), n_tasks=1, classes_per_task=4), 0)


def test_chunks_resume_from_any_chunk_start():
    full = _chunks(23, 4, np.array([5, 13]))
    for i, (s, _) in enumerate(full):
        assert list(_iter_chunks(23, 4, np.array([5, 13]), s)) == full[i:]
    with pytest.raises(ValueError):
        list(_iter_chunks(23, 4, np.array([5, 13]), 7))  # 7 is mid-chunk


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
