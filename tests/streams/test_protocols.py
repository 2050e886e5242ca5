import numpy as np
import pytest

from ocl.errors import OCLError
from ocl.streams.base import ArrayImageSet, Source
from ocl.streams.protocols import bursty, iid, permuted, split


def make_source(n_per_class=20, K=10, with_test=True):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(K), n_per_class)
    x = rng.integers(0, 255, size=(y.size, 4, 4), dtype=np.uint8)
    test = ArrayImageSet(x[: K * 3], np.repeat(np.arange(K), 3)) if with_test else None
    return Source("toy", ArrayImageSet(x, y), test, [str(k) for k in range(K)])


def test_split_tasks_are_disjoint_class_groups_in_order():
    src = make_source()
    s = split(src, seed=3, n_tasks=5)
    assert len(s) == 200 and s.n_tasks == 5
    assert np.all(np.diff(s.tasks) >= 0)
    np.testing.assert_array_equal(s.boundaries(), [40, 80, 120, 160])
    seen = set()
    for t, cls in enumerate(s.task_classes):
        labels = set(s.labels[s.tasks == t].tolist())
        assert labels == set(cls) and not (labels & seen)
        seen |= labels
        # each task's test set holds exactly that task's classes
        assert set(s.tests[t].labels.tolist()) == set(cls)
    # labels are the source's labels at the streamed indices (no relabelling)
    np.testing.assert_array_equal(s.labels, src.train.labels[s.order])
    assert sorted(s.order.tolist()) == list(range(200))


def test_split_is_deterministic_and_seed_dependent():
    src = make_source()
    a, b, c = split(src, seed=1), split(src, seed=1), split(src, seed=2)
    np.testing.assert_array_equal(a.order, b.order)
    assert a.task_classes == b.task_classes
    assert a.task_classes != c.task_classes


def test_split_explicit_class_order_and_errors():
    src = make_source()
    s = split(src, n_tasks=2, classes_per_task=2, class_order=[9, 8, 7, 6])
    assert s.task_classes == [[9, 8], [7, 6]] and len(s) == 80
    with pytest.raises(OCLError, match="classes"):
        split(src, n_tasks=6, classes_per_task=2)
    with pytest.raises(OCLError, match="class_order"):
        split(src, n_tasks=2, classes_per_task=2, class_order=[1, 1, 2, 3])


def test_split_without_test_and_truncation():
    src = make_source(with_test=False)
    s = split(src, n_tasks=5, max_examples=50)
    assert s.tests == [] and len(s) == 50 and s.n_tasks == 2


def test_split_examples_per_task_subsamples_every_task():
    src = make_source()
    full, s = split(src, seed=4, n_tasks=5), split(src, seed=4, n_tasks=5, examples_per_task=15)
    assert len(s) == 75 and s.n_tasks == 5
    np.testing.assert_array_equal(s.boundaries(), [15, 30, 45, 60])
    for t in range(5):  # a subset of each task's own examples, still only its classes
        assert set(s.order[s.tasks == t]) <= set(full.order[full.tasks == t])
    assert s.task_classes == full.task_classes and len(s.tests) == 5
    with pytest.raises(OCLError, match="examples_per_task"):
        split(src, examples_per_task=0)


def test_iid_is_a_seeded_permutation():
    src = make_source()
    s = iid(src, seed=0)
    assert sorted(s.order.tolist()) == list(range(200)) and s.n_tasks == 1
    assert not np.array_equal(s.order, np.arange(200))
    np.testing.assert_array_equal(s.order, iid(src, seed=0).order)
    assert len(s.tests) == 1 and s.tests[0].index.size == 30


def test_permuted_redraws_mapping_every_segment():
    src = make_source()
    s = permuted(src, seed=0, segment_length=50)
    assert s.n_tasks == 4
    np.testing.assert_array_equal(s.boundaries(), [50, 100, 150])
    y_orig = src.train.labels[s.order]
    maps = []
    for t in range(4):
        m = s.tasks == t
        mapping = dict(zip(y_orig[m].tolist(), s.labels[m].tolist()))
        # a consistent bijection within the segment
        assert all(s.labels[m][y_orig[m] == c][0] == mapping[c] for c in mapping)
        assert len(set(mapping.values())) == len(mapping)
        maps.append(mapping)
        # test labels use the same mapping as the segment
        tl = s.tests[t]
        assert all(mapping.get(c, v) == v for c, v in zip(src.test.labels[tl.index].tolist(), tl.labels.tolist()))
    assert maps[0] != maps[1]
    np.testing.assert_array_equal(s.labels, permuted(src, seed=0, segment_length=50).labels)
    with pytest.raises(OCLError):
        permuted(src, segment_length=0)


@pytest.mark.parametrize("K,T,sizes", [(26, 5, [6, 5, 5, 5, 5]), (10, 3, [4, 3, 3]), (10, 5, [2] * 5), (7, 7, [1] * 7)])
def test_split_spreads_the_remainder_classes_and_keeps_every_example(K, T, sizes):
    src = make_source(n_per_class=4, K=K)
    s = split(src, seed=1, n_tasks=T)
    assert [len(c) for c in s.task_classes] == sizes
    assert sorted(s.order.tolist()) == list(range(4 * K))  # every example, every class
    assert set(s.labels.tolist()) == set(range(K)) and s.n_tasks == T
    assert [len(t.labels) for t in s.tests] == [3 * k for k in sizes]


def test_split_with_fewer_classes_per_task_says_what_it_leaves_out(caplog):
    with caplog.at_level("WARNING", logger="ocl.streams.protocols"):
        s = split(make_source(), n_tasks=2, classes_per_task=3)
    assert len(s) == 120 and "use 6 of the 10 classes; the other 4 are left out" in caplog.text


@pytest.mark.parametrize("protocol", [split, iid, permuted, bursty])
@pytest.mark.parametrize("bad", [0, -5, 2.5])
def test_max_examples_must_be_positive_for_every_protocol(protocol, bad):
    with pytest.raises(OCLError, match=rf"max_examples must be positive .* got {bad}"):
        protocol(make_source(), max_examples=bad)


@pytest.mark.parametrize("protocol", [split, iid, permuted, bursty])
def test_max_examples_beyond_the_stream_runs_it_all_and_says_so(protocol, caplog):
    with caplog.at_level("WARNING", logger="ocl.streams.protocols"):
        assert len(protocol(make_source(), max_examples=5000)) == 200
    assert "max_examples=5000 but the stream has only 200 examples" in caplog.text


def run_lengths(labels):
    """Lengths of the maximal runs of equal consecutive labels."""
    change = np.flatnonzero(np.diff(labels)) + 1
    return np.diff(np.concatenate([[0], change, [labels.size]]))


@pytest.mark.parametrize("stay", [0.0, 0.5, 0.9, 0.95])
def test_bursty_run_lengths_follow_the_chain(stay):
    """Away from exhaustion (first 3/4 of a 20,000-step stream of 10 balanced classes) the mean
    run length is 1/(1-stay) and P(same class next) = stay."""
    src = make_source(n_per_class=2000)
    s = bursty(src, seed=0, stay=stay)
    head = s.labels[: 15_000]
    runs = run_lengths(head)
    # geometric run lengths: sd sqrt(stay)/(1-stay); ~15000 (1-stay) runs; 4 standard errors
    tol = 4 * np.sqrt(stay) / (1 - stay) / np.sqrt(runs.size) + 1e-9
    assert abs(runs.mean() - 1 / (1 - stay)) < tol, (runs.mean(), tol)
    assert abs(np.mean(head[1:] == head[:-1]) - stay) < 4 * np.sqrt(stay * (1 - stay) / head.size) + 1e-9
    if stay == 0.0:
        assert runs.max() == 1


def test_bursty_uses_every_example_once_and_moves_off_exhausted_classes():
    # unbalanced: class 0 has 3 examples, class 1 has 200, the others 20; with stay 0.99 a run
    # of class 0 must end when it runs out, and the long tail is class 1 alone
    rng = np.random.default_rng(0)
    y = np.concatenate([np.zeros(3), np.ones(200), np.repeat(np.arange(2, 6), 20)]).astype(np.int64)
    x = rng.integers(0, 255, size=(y.size, 4, 4), dtype=np.uint8)
    test = ArrayImageSet(x[:12], y[:12])
    src = Source("unbalanced", ArrayImageSet(x, y), test, [str(k) for k in range(7)])  # class 6 has none
    for seed in range(5):
        s = bursty(src, seed=seed, stay=0.99)
        assert sorted(s.order.tolist()) == list(range(y.size))  # every example exactly once
        np.testing.assert_array_equal(s.labels, y[s.order])
        np.testing.assert_array_equal(np.bincount(s.labels, minlength=7), np.bincount(y, minlength=7))
        assert s.n_tasks == 1 and s.num_classes == 7 and s.name == "bursty"
        assert len(s.tests) == 1 and s.tests[0].index.tolist() == list(range(12))
        # nearly never jumping, the chain leaves a class when it runs out: one run per class
        s = bursty(src, seed=seed, stay=1 - 1e-6)
        assert run_lengths(s.labels).size == 6 and sorted(np.unique(s.labels).tolist()) == [0, 1, 2, 3, 4, 5]
    # stay 0: consecutive steps share a class only once a single class is left (the tail)
    s = bursty(src, seed=0, stay=0.0)
    same = np.flatnonzero(s.labels[1:] == s.labels[:-1])
    assert same.size and np.all(s.labels[same[0]:] == s.labels[-1])
    assert len(set(s.labels[: same[0]].tolist())) == 6


def test_bursty_is_deterministic_per_seed_truncates_and_refuses_bad_stay():
    src = make_source(n_per_class=50)
    a, b, c = bursty(src, seed=3), bursty(src, seed=3), bursty(src, seed=4)
    np.testing.assert_array_equal(a.order, b.order)
    assert not np.array_equal(a.order, c.order)
    cut = bursty(src, seed=3, max_examples=123)
    assert len(cut) == 123 and np.array_equal(cut.order, a.order[:123])
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.9", True):
        with pytest.raises(OCLError, match="stay"):
            bursty(src, stay=bad)
