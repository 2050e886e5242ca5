"""Stream protocols: how a source's training split becomes an ordered, labelled stream.

Every protocol is deterministic given ``seed`` and returns a :class:`Stream`:
the order in which training examples arrive, the label the learner sees for each
(after any relabelling), the task index of each step, and each task's held-out test
examples when the source has a test split.

Hydra configs name these functions with ``_partial_: true``; the runner calls
``protocol(source, seed=seed)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ocl.errors import OCLError
from ocl.streams.base import Source

log = logging.getLogger(__name__)


@dataclass
class TaskTest:
    """Held-out test examples of one task.

    Attributes:
        index: ``(m,)`` indices into ``source.test``.
        labels: ``(m,)`` labels as the learner sees them for this task.
    """

    index: np.ndarray
    labels: np.ndarray


@dataclass
class Stream:
    """An ordered labelled stream over ``source.train``.

    Attributes:
        name: protocol name (``"split"``, ``"iid"``, ``"permuted"``).
        order: ``(N,)`` indices into ``source.train``, in arrival order.
        labels: ``(N,)`` int64 label revealed at each step (after relabelling).
        tasks: ``(N,)`` int64 task index of each step (non-decreasing).
        num_classes: K, size of the label space the learner predicts over.
        tests: one :class:`TaskTest` per task, or empty when the source has no test split.
        task_classes: the (original) classes of each task, for class-incremental splits.
    """

    name: str
    order: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray
    num_classes: int
    tests: list[TaskTest] = field(default_factory=list)
    task_classes: list[list[int]] | None = None

    def __len__(self) -> int:
        return int(self.order.shape[0])

    @property
    def n_tasks(self) -> int:
        return int(self.tasks[-1]) + 1 if len(self) else 0

    def boundaries(self) -> np.ndarray:
        """Step indices at which a new task starts (excluding step 0), ``(n_tasks - 1,)``."""
        return np.flatnonzero(np.diff(self.tasks)) + 1


def _check_max_examples(max_examples: int | None) -> None:
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise OCLError(f"protocol.max_examples must be positive (a number of examples), or null for the whole "
                       f"stream; got {max_examples!r}.")


def _truncate(stream: Stream, max_examples: int | None) -> Stream:
    """Keep the first ``max_examples`` steps (and the tests of the tasks that remain)."""
    _check_max_examples(max_examples)
    if max_examples is None:
        return stream
    if max_examples > len(stream):
        log.warning("protocol.max_examples=%d but the stream has only %d examples: running all %d.",
                    max_examples, len(stream), len(stream))
        return stream
    n_tasks = int(stream.tasks[max_examples - 1]) + 1
    return Stream(
        name=stream.name,
        order=stream.order[:max_examples],
        labels=stream.labels[:max_examples],
        tasks=stream.tasks[:max_examples],
        num_classes=stream.num_classes,
        tests=stream.tests[:n_tasks],
        task_classes=None if stream.task_classes is None else stream.task_classes[:n_tasks],
    )


def task_sizes(n_classes: int, n_tasks: int) -> list[int]:
    """Classes per task when ``n_classes`` are spread over ``n_tasks``: as equal as possible,
    the first ``n_classes % n_tasks`` tasks one class more (26 over 5: 6, 5, 5, 5, 5)."""
    q, r = divmod(n_classes, n_tasks)
    return [q + 1 if t < r else q for t in range(n_tasks)]


def split(
    source: Source,
    seed: int = 0,
    n_tasks: int = 5,
    classes_per_task: int | None = None,
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = True,
    max_examples: int | None = None,
    examples_per_task: int | None = None,
) -> Stream:
    """Class-incremental split: tasks are disjoint groups of classes, one after another.

    The learner predicts over all ``source.num_classes`` classes (single head). Within a
    task the examples are shuffled. By default every class is used: K classes over T tasks
    give each task K // T classes and the first K % T tasks one more (26 over 5: 6,5,5,5,5).

    Args:
        n_tasks: number of tasks.
        classes_per_task: classes in each task; ``None`` (default) spreads every class (of
            ``class_order`` if given) over the tasks as above. With a number, the first
            ``n_tasks * classes_per_task`` classes of the order are used (a warning says how
            many are left out).
        class_order: explicit order of classes (overrides the seeded shuffle).
        shuffle_classes: draw the class order from ``seed`` (else 0, 1, 2, ...).
        max_examples: cut the stream after this many steps (``None``: whole stream).
        examples_per_task: keep a seeded random subset of at most this many examples of each
            task (``None``: all); a shorter stream that still visits every task.
    """
    K = source.num_classes
    _check_max_examples(max_examples)
    if examples_per_task is not None and examples_per_task < 1:
        raise OCLError(f"protocol.examples_per_task must be >= 1; got {examples_per_task}.")
    if n_tasks < 1:
        raise OCLError(f"protocol.n_tasks must be >= 1; got {n_tasks}.")
    rng = np.random.default_rng(seed)
    if class_order is not None:
        order_c = np.asarray(list(class_order), dtype=np.int64)
        if sorted(order_c.tolist()) != sorted(set(order_c.tolist())) or order_c.min() < 0 or order_c.max() >= K:
            raise OCLError(f"protocol.class_order must list distinct classes in [0, {K}); got {list(order_c)}.")
    else:
        order_c = rng.permutation(K) if shuffle_classes else np.arange(K)
    available = len(order_c)
    if classes_per_task is None:
        sizes = task_sizes(available, n_tasks)
    else:
        if classes_per_task < 1:
            raise OCLError(f"protocol.classes_per_task must be >= 1; got {classes_per_task}.")
        sizes = [classes_per_task] * n_tasks
    if min(sizes) < 1 or sum(sizes) > available:
        what = "protocol.class_order lists" if class_order is not None else f"{source.name} has"
        raise OCLError(
            f"protocol: {n_tasks} tasks x {max(min(sizes), 1)} classes per task needs {n_tasks * max(min(sizes), 1)} "
            f"classes, but {what} {available}. Lower protocol.n_tasks or protocol.classes_per_task."
        )
    if sum(sizes) < available:
        log.warning("protocol: %d tasks x %d classes per task use %d of the %d classes; the other %d are left out "
                    "of the stream (protocol.classes_per_task=null uses them all).",
                    n_tasks, sizes[0], sum(sizes), available, available - sum(sizes))
    ends = np.cumsum(sizes)
    task_classes = [order_c[e - k : e].tolist() for k, e in zip(sizes, ends)]

    y = source.train.labels
    order, tasks = [], []
    for t, cls in enumerate(task_classes):
        idx = np.flatnonzero(np.isin(y, cls))
        if idx.size == 0:
            raise OCLError(f"protocol: task {t} (classes {cls}) has no training examples in {source.name}.")
        idx = rng.permutation(idx)[:examples_per_task]  # [:None] keeps all
        order.append(idx)
        tasks.append(np.full(idx.size, t, dtype=np.int64))
    order_a = np.concatenate(order)
    tests = []
    if source.test is not None:
        yt = source.test.labels
        for cls in task_classes:
            idx = np.flatnonzero(np.isin(yt, cls))
            tests.append(TaskTest(index=idx, labels=yt[idx]))
    stream = Stream("split", order_a, y[order_a].astype(np.int64), np.concatenate(tasks), K, tests, task_classes)
    return _truncate(stream, max_examples)


def iid(source: Source, seed: int = 0, max_examples: int | None = None) -> Stream:
    """One task: the training split in a seeded random order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(source.train))
    tests = []
    if source.test is not None:
        tests = [TaskTest(np.arange(len(source.test)), source.test.labels.astype(np.int64))]
    stream = Stream(
        "iid", order, source.train.labels[order].astype(np.int64),
        np.zeros(order.size, dtype=np.int64), source.num_classes, tests,
    )
    return _truncate(stream, max_examples)


def permuted(
    source: Source,
    seed: int = 0,
    segment_length: int = 1000,
    max_examples: int | None = None,
) -> Stream:
    """Label-permuted segments: examples in seeded random order, and every
    ``segment_length`` steps the mapping class -> label is re-drawn at random.

    This is the non-stationary setting of Bornschein et al. (2024): the inputs stay
    i.i.d. but what they mean changes abruptly, so a learner must re-learn fast. Each
    segment is a task; its test set is the whole test split under that segment's mapping.
    The first segment uses a random mapping too (no segment is privileged).
    """
    if segment_length < 1:
        raise OCLError(f"protocol.segment_length must be >= 1; got {segment_length}.")
    _check_max_examples(max_examples)
    K = source.num_classes
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(source.train))
    if max_examples is not None:
        if max_examples > order.size:
            log.warning("protocol.max_examples=%d but the stream has only %d examples: running all %d.",
                        max_examples, order.size, order.size)
        order = order[:max_examples]
    n = order.size
    tasks = np.arange(n, dtype=np.int64) // segment_length
    n_seg = int(tasks[-1]) + 1
    perms = np.stack([rng.permutation(K) for _ in range(n_seg)])  # (n_seg, K)
    labels = perms[tasks, source.train.labels[order]].astype(np.int64)
    tests = []
    if source.test is not None:
        yt = source.test.labels
        tests = [TaskTest(np.arange(yt.size), perms[s, yt].astype(np.int64)) for s in range(n_seg)]
    return Stream("permuted", order, labels, tasks, K, tests)


def bursty(source: Source, seed: int = 0, stay: float = 0.9, max_examples: int | None = None) -> Stream:
    """A temporally correlated stream: consecutive examples tend to share a class, as in
    video, geolocated photo streams (CLOC) or a user's albums.

    The class sequence is a seeded Markov chain: after each example the stream stays on
    the current class with probability ``stay`` and otherwise jumps to a class drawn
    uniformly from the *other* classes that still have examples. Examples of a class are
    drawn without replacement in a seeded random order, until the training split runs out:
    every training example appears exactly once, so the class counts are the source's.

    Run lengths: away from exhaustion a run lasts a geometric number of steps, mean
    ``1 / (1 - stay)`` (10 at 0.9; a jump never lands on the class it leaves, so this is
    exact), and P(next example has the same class) = ``stay``. Exhaustion bends this near
    the end of the stream: a class that runs out ends its run early (the chain moves to a
    class that still has examples), and once a single class is left it runs to the end.
    ``stay = 0`` never repeats a class while another one is available.

    One task; its held-out test set is the whole test split.

    Args:
        stay: probability of staying on the current class, in ``[0, 1)``.
        max_examples: cut the stream after this many steps (``None``: all).
    """
    if isinstance(stay, bool) or not isinstance(stay, (int, float)) or not 0.0 <= stay < 1.0:
        raise OCLError(f"protocol.stay must be a number in [0, 1) (the probability of staying on the current "
                       f"class; 1 would never leave it); got {stay!r}.")
    rng = np.random.default_rng(seed)
    y = source.train.labels
    K = source.num_classes
    pools = [rng.permutation(np.flatnonzero(y == k)) for k in range(K)]  # each class's examples, seeded order
    left = np.array([p.size for p in pools])  # examples still to draw, per class
    order = np.empty(y.size, dtype=np.int64)
    n = 0
    c = int(rng.choice(np.flatnonzero(left > 0)))
    # One iteration per run: a run's length is geometric (the per-step coin of the chain,
    # memoryless), so drawing it at once is the same chain at a cost of O(runs), not O(steps).
    while n < y.size:
        length = int(rng.geometric(1.0 - stay))  # >= 1
        take = min(length, int(left[c]))
        pool = pools[c]
        order[n : n + take] = pool[pool.size - left[c] : pool.size - left[c] + take]
        left[c] -= take
        n += take
        others = np.flatnonzero(left > 0)
        others = others[others != c]
        if others.size:  # the run ended (a jump, or the class ran out): move to another class
            c = int(others[rng.integers(others.size)])
        # else: only c is left (a run that ended just continues with c), or nothing is
    tests = []
    if source.test is not None:
        tests = [TaskTest(np.arange(len(source.test)), source.test.labels.astype(np.int64))]
    stream = Stream("bursty", order, y[order].astype(np.int64), np.zeros(y.size, dtype=np.int64), K, tests)
    return _truncate(stream, max_examples)
