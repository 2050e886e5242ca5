"""ocl's metrics against Avalanche's own metric classes, fed the same predictions.

Where both libraries define a metric the values must agree; where the definitions
differ the test pins the difference down, so a reader of a comparison table knows
exactly how an ocl number relates to the one Avalanche would log:

- online accuracy / mean log-loss: Avalanche's standalone ``Accuracy`` and ``LossMetric``
  (running means weighted by mini-batch size) over the same prequential chunks are
  exactly ocl's ``avg_online_accuracy`` and ``mean_log_loss``.
- accuracy matrix: Avalanche's ``AccuracyMatrixPluginMetric`` (driven through its plugin
  callbacks, as a strategy's eval loop would) equals the matrix ocl's runner fills with
  ``evaluate_tasks`` at task boundaries.
- backward transfer: Avalanche's ``StreamBWT`` = mean_{j<T-1} acc[T-1, j] - acc[j, j] =
  ocl's ``backward_transfer`` (Lopez-Paz & Ranzato 2017).
- forgetting: **different definitions.** Avalanche's ``StreamForgetting`` (and
  ``avalanche.evaluation.functional.forgetting``) measure the drop from the accuracy
  *just after learning* task j: mean_{j<T-1} acc[j, j] - acc[T-1, j] = -BWT. ocl uses
  Chaudhry et al. (2018): the drop from the *best* accuracy task j ever had,
  max_{j<=i<T-1} acc[i, j] - acc[T-1, j]. They agree when no task improves after it was
  learned; otherwise ocl's forgetting is larger (never smaller).
- final accuracy: Avalanche's ``StreamAccuracy`` pools every test example of the final
  evaluation; ocl's ``final_avg_accuracy`` averages the per-task accuracies. Equal when
  all tasks have test sets of one size; otherwise the pooled value is the size-weighted mean.
- average anytime accuracy: Avalanche has no metric of that name (its
  ``CumulativeAccuracyPluginMetric`` is per-class-set); not compared.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.evaluation.functional import forgetting as av_forgetting_matrix
from avalanche.evaluation.metrics import Accuracy, LossMetric, StreamAccuracy, StreamBWT, StreamForgetting
from avalanche.evaluation.metrics.acc_matrix import AccuracyMatrixPluginMetric

from ocl import metrics as M
from ocl.learners.base import Learner
from ocl.runner import evaluate_tasks
from ocl.streams.protocols import Stream, TaskTest
from ocl.tracker import Tracker

K = 6  # classes


def test_online_accuracy_and_log_loss_match_avalanche():
    g = torch.Generator().manual_seed(0)
    n = 301
    logits = torch.randn(n, K, generator=g) * 2
    y = torch.randint(0, K, (n,), generator=g)
    tracker = Tracker(n)
    acc, loss = Accuracy(), LossMetric()
    start = 0
    sizes = np.random.default_rng(0).integers(1, 8, size=n)  # prequential chunks of 1..7 examples
    for c in sizes:
        xs, ys = logits[start : start + c], y[start : start + c]
        if not len(ys):
            break
        tracker.record(F.log_softmax(xs, dim=1), ys)
        acc.update(xs, ys)
        loss.update(F.cross_entropy(xs, ys, reduction="none"), len(ys))
        start += len(ys)
    assert start == n
    s = tracker.summary()
    assert s["avg_online_accuracy"] == pytest.approx(acc.result(), abs=1e-12)
    assert s["mean_log_loss"] == pytest.approx(loss.result(), rel=1e-6)
    assert s["cumulative_log_loss"] == pytest.approx(loss.result() * n, rel=1e-6)


# ---------------------------------------------------------------- task-boundary metrics


class Lookup(Learner):
    """A "learner" whose held-out predictions are given: logits[phase][test index]."""

    def __init__(self, logits):
        self.logits, self.phase = logits, 0

    def predict(self, x):
        return F.log_softmax(self.logits[self.phase][x[:, 0].long()], dim=1)

    def update(self, x, y):
        pass


def scenario(sizes, seed):
    """T tasks with test sets of ``sizes``; logits[i] ``(n_test, K)`` = predictions after task i,
    right with a probability that varies by (i, j), so the accuracy matrix is irregular."""
    T, n = len(sizes), sum(sizes)
    rng = np.random.default_rng(seed)
    y = torch.from_numpy(rng.integers(0, K, size=n))
    starts = np.cumsum([0, *sizes])
    tests = [TaskTest(np.arange(starts[j], starts[j + 1]), y[starts[j] : starts[j + 1]].numpy()) for j in range(T)]
    logits = []
    for i in range(T):
        lg = torch.from_numpy(rng.normal(size=(n, K))).float()
        for j in range(T):
            p = rng.uniform(0.05, 0.95)
            sl = slice(starts[j], starts[j + 1])
            hit = torch.from_numpy(rng.random(sizes[j]) < p)
            lg[sl][hit, y[sl][hit]] += 10.0  # these predictions are right
        logits.append(lg)
    stream = Stream("test", order=np.zeros(T, np.int64), labels=np.zeros(T, np.int64), tasks=np.arange(T),
                    num_classes=K, tests=tests)
    return stream, logits, y, starts


def ocl_matrix(stream, logits):
    """What ocl's runner records: after task i, evaluate_tasks on every task's test set."""
    learner = Lookup(logits)
    feats = np.arange(logits[0].shape[0], dtype=np.float32)[:, None]  # "feature" = test index
    rows = []
    for i in range(len(logits)):
        learner.phase = i
        rows.append(evaluate_tasks(learner, feats, stream, batch_size=7))
    return np.stack(rows)


def avalanche_eval(logits, y, starts, plugins, batch=7):
    """Drive Avalanche plugin metrics through the callbacks of a strategy's train/eval loop:
    train on experience i, then evaluate on every experience of the test stream."""
    T = len(logits)
    exp = [SimpleNamespace(current_experience=j, task_labels=[0], origin_stream=SimpleNamespace(name="test"))
           for j in range(T)]
    s = SimpleNamespace(is_eval=False, is_training=True, clock=SimpleNamespace(train_iterations=0),
                        experience=None, mb_output=None, mb_y=None)
    for i in range(T):
        s.is_eval, s.is_training, s.experience = False, True, exp[i]
        for p in plugins:
            p.before_training(s)
            p.before_training_exp(s)
        for p in plugins:
            p.after_training_exp(s)
            p.after_training(s)
        s.is_eval, s.is_training = True, False
        for p in plugins:
            p.before_eval(s)
        for j in range(T):
            s.experience = exp[j]
            for p in plugins:
                p.before_eval_exp(s)
            for b in range(starts[j], starts[j + 1], batch):
                e = min(b + batch, starts[j + 1])
                s.mb_output, s.mb_y = logits[i][b:e], y[b:e]
                for p in plugins:
                    p.before_eval_iteration(s)
                    p.after_eval_iteration(s)
            for p in plugins:
                p.after_eval_exp(s)
        for p in plugins:
            p.after_eval(s)


@pytest.mark.parametrize("sizes", [(30, 30, 30, 30), (25, 40, 17, 33)], ids=["equal-tests", "unequal-tests"])
def test_accuracy_matrix_bwt_forgetting_final_match_avalanche(sizes):
    stream, logits, y, starts = scenario(sizes, seed=len(set(sizes)))
    acc = ocl_matrix(stream, logits)
    mat, fgt, bwt, stream_acc = AccuracyMatrixPluginMetric(), StreamForgetting(), StreamBWT(), StreamAccuracy()
    avalanche_eval(logits, y, starts, [mat, fgt, bwt, stream_acc])
    T = len(sizes)

    np.testing.assert_allclose(mat.result().numpy(), acc, atol=1e-6)  # Avalanche stores float32
    assert M.backward_transfer(acc) == pytest.approx(bwt.result(), abs=1e-6)
    # Avalanche's forgetting is -BWT (drop from acc[j, j]); ocl's (Chaudhry) is >= it
    assert fgt.result() == pytest.approx(-M.backward_transfer(acc), abs=1e-6)
    assert M.forgetting(acc) >= fgt.result() - 1e-9
    best_on_diagonal = all(acc[j, j] >= acc[j:T - 1, j].max() for j in range(T - 1))
    if best_on_diagonal:
        assert M.forgetting(acc) == pytest.approx(fgt.result(), abs=1e-6)
    assert av_forgetting_matrix(acc)[-1, :-1].mean() == pytest.approx(-M.backward_transfer(acc), abs=1e-12)
    # final accuracy: Avalanche pools the examples, ocl averages the tasks
    n = np.asarray(sizes)
    assert stream_acc.result() == pytest.approx(float((acc[-1] * n).sum() / n.sum()), abs=1e-6)
    if len(set(sizes)) == 1:
        assert M.final_average_accuracy(acc) == pytest.approx(stream_acc.result(), abs=1e-6)


def test_forgetting_definitions_differ_when_a_task_recovers():
    """Hand-computed: task 0 improves after it was learned (0.6 -> 0.8), then drops to 0.5."""
    acc = np.array([[0.6, 0.0, 0.0],
                    [0.8, 0.9, 0.0],
                    [0.5, 0.7, 0.95]])
    # ocl / Chaudhry: task 0: max(0.6, 0.8) - 0.5 = 0.3; task 1: 0.9 - 0.7 = 0.2 -> 0.25
    assert M.forgetting(acc) == pytest.approx(0.25)
    # Avalanche: task 0: 0.6 - 0.5 = 0.1; task 1: 0.9 - 0.7 = 0.2 -> 0.15 = -BWT
    assert av_forgetting_matrix(acc)[-1, :-1].mean() == pytest.approx(0.15)
    assert M.backward_transfer(acc) == pytest.approx(-0.15)
    f = StreamForgetting()  # the plugin on the same matrix, via per-key updates as its eval loop makes them
    for i in range(3):
        f.before_eval(None)
        for j in range(3):
            f.exp_update(j, acc[i, j], initial=(i == j))
            if f.exp_result(j) is not None:
                f.stream_forgetting.update(f.exp_result(j), weight=1)
    assert f.result() == pytest.approx(0.15)


def test_forgetting_definitions_agree_when_no_task_improves_later():
    acc = np.array([[0.9, 0.0, 0.0],
                    [0.7, 0.8, 0.0],
                    [0.6, 0.5, 0.9]])
    # both: ((0.9 - 0.6) + (0.8 - 0.5)) / 2 = 0.3
    assert M.forgetting(acc) == pytest.approx(0.3)
    assert av_forgetting_matrix(acc)[-1, :-1].mean() == pytest.approx(0.3)
