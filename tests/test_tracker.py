"""The per-step tracker (in memory and on disk) and near-future evaluation records."""

import math
import pickle

import numpy as np
import pytest
import torch

from ocl.errors import OCLError
from ocl.metrics import online_accuracy_curve
from ocl.sidefile import relative_to
from ocl.tracker import NearFutureTracker, Tracker, near_future_summary


def test_near_future_schedule_hand_computed():
    """Which step's input is evaluated after each chunk [start, end) of a 20-step stream."""
    nf = NearFutureTracker(offset=3, every=5)
    # chunks of 1: after steps 4, 9, 14, 19 (every 5th), targets t + 1 + 3; 23 is past the end
    assert [nf.target(t, t + 1, 20) for t in (4, 9, 14, 19)] == [8, 13, 18, None]
    assert [t for t in range(20) if nf.target(t, t + 1, 20) is not None] == [4, 9, 14]
    # chunks of 4: after each chunk that holds a 5th step, target end + 3
    assert [nf.target(s, s + 4, 20) for s in range(0, 20, 4)] == [None, 11, 15, 19, None]
    # S = 0, every step: the next example, which online accuracy scores too
    assert [NearFutureTracker(0, 1).target(t, t + 1, 5) for t in range(5)] == [1, 2, 3, 4, None]
    for bad in ((-1, 5), (1.5, 5), (3, 0), (3, True)):
        with pytest.raises(ValueError):
            NearFutureTracker(*bad)


def test_near_future_tracker_scores_and_round_trips():
    nf = NearFutureTracker(offset=2, every=1)
    assert math.isnan(nf.summary()["near_future_accuracy"]) and nf.summary()["near_future_evaluations"] == 0
    for i, (p, y) in enumerate([([0.7, 0.3], 0), ([0.4, 0.6], 0), ([0.9, 0.1], 0)] * 30):  # > 64: the array grows
        nf.record(i, i + 3, torch.log(torch.tensor([p])), torch.tensor([y]))
        if i == 40:
            state = nf.state_dict()
    s = nf.summary()
    assert s["near_future_evaluations"] == 90 and s["near_future_accuracy"] == pytest.approx(2 / 3)
    assert s["near_future_mean_log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.9)) / 3)
    assert (s["near_future_offset"], s["near_future_every"]) == (2, 1)
    np.testing.assert_array_equal(nf.records["target"], np.arange(90) + 3)
    again = NearFutureTracker(2, 1)
    again.load_state_dict(state)  # a checkpoint after evaluation 40, then the same evaluations again
    for i, (p, y) in list(enumerate([([0.7, 0.3], 0), ([0.4, 0.6], 0), ([0.9, 0.1], 0)] * 30))[41:]:
        again.record(i, i + 3, torch.log(torch.tensor([p])), torch.tensor([y]))
    np.testing.assert_array_equal(again.records, nf.records)
    with pytest.raises(ValueError, match="S=2"):
        NearFutureTracker(3, 1).load_state_dict(state)
    assert set(near_future_summary(None)) == set(s) and all(v is None for v in near_future_summary(None).values())


def test_tracker_scores_log_loss_in_nats():
    tr = Tracker(3)
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    tr.record(logp, torch.tensor([0, 2]))
    tr.record(torch.log(torch.tensor([[0.2, 0.8, 0.0]])), torch.tensor([2]))  # p_true = 0
    s = tr.summary()
    assert s["n_examples"] == 3
    assert s["avg_online_accuracy"] == pytest.approx(2 / 3)
    assert tr.loss[0] == pytest.approx(math.log(2)) and tr.loss[1] == pytest.approx(-math.log(0.7))
    # -log(0) is clamped to a large finite loss and counted
    assert tr.nonfinite == 1 and np.isfinite(s["cumulative_log_loss"]) and tr.loss[2] > 60
    with pytest.raises(ValueError):
        tr.record(logp, torch.tensor([0, 1]))


def test_tracker_on_disk_equals_in_memory_and_resumes(tmp_path):
    n, rng = 1000, np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 3, n))
    logp = torch.log_softmax(torch.from_numpy(rng.normal(size=(n, 3))).float(), 1)
    tasks = np.arange(n) // 300
    mem, disk = Tracker(n, tasks), Tracker(n, tasks, path=str(tmp_path / "s.npy"))
    for s in range(0, 600, 7):
        mem.record(logp[s : s + 7], y[s : s + 7])
        disk.record(logp[s : s + 7], y[s : s + 7])
    with relative_to(tmp_path):  # a checkpoint at step 602 (pickled as a checkpoint does) ...
        blob = pickle.dumps(disk.state_dict())
    disk.record(logp[602:610], y[602:610])  # ... then records that a crash makes void
    disk.close()
    with relative_to(tmp_path):
        state = pickle.loads(blob)  # verifies the records [0, 602)
    disk = Tracker(n, tasks, path=str(tmp_path / "s.npy"), resume=True)
    disk.load_state_dict(state)
    for s in range(602, n, 7):
        mem.record(logp[s : s + 7], y[s : s + 7])
        disk.record(logp[s : s + 7], y[s : s + 7])
    assert mem.summary() == disk.summary()
    np.testing.assert_array_equal(mem.loss, disk.loss)
    np.testing.assert_array_equal(mem.correct, disk.correct)
    keep = np.array([0, 5, 99, 500, 999])
    np.testing.assert_array_equal(disk.accuracy_curve_at(keep, 100), online_accuracy_curve(mem.correct, 100)[keep])
    rec = np.load(tmp_path / "s.npy")  # a plain structured array
    np.testing.assert_array_equal(rec["task"], tasks) and np.testing.assert_array_equal(rec["label"], y.numpy())
    # an edited record among those the checkpoint counts is refused on resume
    rec[5]["loss"] += 1.0
    np.save(tmp_path / "s.npy", rec)
    with relative_to(tmp_path), pytest.raises(OCLError, match=r"s.npy \(the per-step records\) changed after the checkpoint"):
        pickle.loads(blob)
