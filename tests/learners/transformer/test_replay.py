"""History store and replay cursors: only revealed data, forward walks, jumps with resets."""

import numpy as np
import pytest
import torch

from ocl.learners.memory import History
from ocl.learners.transformer.replay import ReplayCursors


def test_history_grows_and_gathers_chunks():
    h = History(feature_dim=3, capacity=2)
    x = torch.arange(30.0).view(10, 3)
    y = torch.arange(10)
    for s in range(0, 10, 3):  # chunks 3,3,3,1 force several doublings
        h.append(x[s : s + 3], y[s : s + 3])
    assert len(h) == 10
    cx, cy = h.chunks(np.array([0, 4, 7]), 3)
    assert cx.shape == (3, 3, 3) and torch.equal(cy, torch.tensor([[0, 1, 2], [4, 5, 6], [7, 8, 9]]))
    assert torch.equal(cx[1], x[4:7])


def test_history_refuses_to_read_unrevealed_examples():
    h = History(feature_dim=2)
    h.append(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long))
    h.chunks(np.array([3]), 2)  # reads 3, 4: fine
    with pytest.raises(AssertionError):
        h.chunks(np.array([4]), 2)  # would read index 5, not revealed


@pytest.mark.parametrize("rule", ["prob", "start"])
def test_cursors_walk_forward_read_only_revealed_and_flag_jumps(rule):
    rng = np.random.default_rng(0)
    cur = ReplayCursors(n_streams=3, reset_rule=rule, seed=1)
    n, prev = 0, None
    for _ in range(400):
        c = int(rng.integers(1, 5))
        plan = cur.step(n, c)
        if n < c:
            assert not plan.active.any()
        else:
            assert plan.active.all()
            assert (plan.starts >= 0).all() and (plan.starts + c <= n).all()  # only revealed examples
            if prev is not None:
                walked = plan.starts == prev
                assert (walked | plan.reset).all()  # either continued where it stopped, or jumped (reset)
            if rule == "start":
                assert (plan.starts[plan.reset] == 0).all()
            prev = plan.starts + c
        n += c


@pytest.mark.parametrize("rule,mean,lowest_quarter", [("start", 0.5, 0.25), ("prob", 0.75, 1 / 32)])
def test_reset_rules_spread_cursors_over_the_past(rule, mean, lowest_quarter):
    """Jumps at rate C/t: back to the start gives uniform positions over the past; to a
    uniform random point gives the recency-weighted density -log(1 - f) (mean 3/4)."""
    cur = ReplayCursors(n_streams=64, reset_rule=rule, seed=0)
    n, fractions = 0, []
    for step in range(2000):
        plan = cur.step(n, 1)
        if step > 500:
            fractions.append((plan.starts + 0.5) / n)
        n += 1
    fractions = np.concatenate(fractions)
    assert abs(fractions.mean() - mean) < 0.05
    assert abs((fractions < 0.25).mean() - lowest_quarter) < 0.04


def test_cursors_are_seeded():
    runs = []
    for seed in (3, 3, 4):
        cur = ReplayCursors(2, "prob", seed=seed)
        runs.append(np.stack([cur.step(n, 1).starts for n in range(1, 200)]))
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


def test_history_lives_in_a_file_and_pickles_by_path(tmp_path):
    """Inside a checkpoint (sidefile.relative_to the run dir) a history pickles as a relative
    path, a count and a checksum; unpickling verifies the file and resumes into the copy."""
    import pickle
    import shutil

    from ocl.errors import OCLError
    from ocl.sidefile import relative_to

    run = tmp_path / "run"
    run.mkdir()
    h = History(feature_dim=3)
    h.relocate(run / "h.bin")
    x, y = torch.arange(30.0).view(10, 3), torch.arange(10)
    h.append(x[:6], y[:6])
    with relative_to(run):
        blob = pickle.dumps(h)  # a checkpoint: the path, n=6, the record dtype and a sha256, not the data
    assert len(blob) < 600 and str(tmp_path).encode() not in blob and x[1].numpy().tobytes() not in blob
    h.append(x[6:], y[6:])  # written after the checkpoint, then a crash
    with relative_to(run):
        g = pickle.loads(blob)
    assert len(g) == 6
    g.append(x[6:8], y[6:8])  # overwrites the void rows
    cx, cy = g.chunks(np.array([0, 5]), 3)
    assert torch.equal(cx[1], x[5:8]) and torch.equal(cy[0], y[:3])
    anon = History(feature_dim=3)  # an anonymous file pickles its data
    anon.append(x, y)
    assert torch.equal(pickle.loads(pickle.dumps(anon)).chunks(np.array([7]), 3)[0][0], x[7:])
    # a copied run directory resumes into its own file, not the original's
    shutil.copytree(run, tmp_path / "copy")
    (run / "h.bin").unlink()
    with relative_to(tmp_path / "copy"):
        c = pickle.loads(blob)
    assert c.path == str(tmp_path / "copy" / "h.bin") and torch.equal(c.chunks(np.array([0]), 6)[0][0], x[:6])
    # a flipped label byte in the counted records is refused, not an IndexError later
    raw = bytearray((tmp_path / "copy" / "h.bin").read_bytes())
    raw[20 * 1 + 12 + 1] ^= 1  # record 1: bytes [20, 40) = 3 float32 then the int64 label; its second byte
    (tmp_path / "copy" / "h.bin").write_bytes(bytes(raw))
    changed = r"h.bin \(the replay history\) changed after the checkpoint"
    with relative_to(tmp_path / "copy"), pytest.raises(OCLError, match=changed):
        pickle.loads(blob)
    (tmp_path / "copy" / "h.bin").write_bytes(b"")
    with relative_to(tmp_path / "copy"), pytest.raises(OCLError, match="missing or shorter"):
        pickle.loads(blob)


@pytest.mark.parametrize("rule", ["prob", "start"])
def test_plan_changes_nothing_until_committed_and_commit_equals_step(rule):
    planner, stepper = ReplayCursors(4, rule, seed=3), ReplayCursors(4, rule, seed=3)
    n = 0
    for c in [1, 2, 1, 3, 1, 1, 2] * 10:
        first, again = planner.plan(n, c), planner.plan(n, c)  # e.g. predict twice before update
        for a, b in zip((first.active, first.starts, first.reset), (again.active, again.starts, again.reset)):
            assert np.array_equal(a, b)
        planner.commit(first)
        taken = stepper.step(n, c)
        assert np.array_equal(first.starts, taken.starts) and np.array_equal(first.reset, taken.reset)
        assert np.array_equal(planner.pos, stepper.pos)
        n += c
    assert planner.rng.random() == stepper.rng.random()
