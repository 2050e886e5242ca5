"""Checkpoint and resume: a run killed at any point and resumed ends exactly like an
uninterrupted run; checkpoint writes are atomic; resume refuses what it cannot continue."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from ocl import checkpoint as ckpt
from ocl.errors import OCLError, StorageError
from ocl.experiment import run_experiment

# Keys that legitimately differ between an uninterrupted and a resumed run.
VOLATILE = {"examples_per_second", "learn_seconds", "eval_seconds", "feature_seconds", "host", "config", "resumed",
            "threads"}
TINY_TRANSFORMER = ["learner=transformer", "learner.d_model=16", "learner.window=4", "learner.replay_streams=2"]
BASE = ["protocol.max_examples=500", "protocol.n_tasks=5"]


def config(tmp_path, *overrides):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name="config",
                       overrides=["progress=false", f"cache_dir={tmp_path / 'cache'}", *BASE, *overrides])


def same_results(ref_dir: Path, run_dir: Path) -> None:
    a = json.loads((ref_dir / "results.json").read_text())
    b = json.loads((run_dir / "results.json").read_text())
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}
    assert (ref_dir / "steps.csv").read_bytes() == (run_dir / "steps.csv").read_bytes()
    np.testing.assert_array_equal(np.load(ref_dir / "steps.npy"), np.load(run_dir / "steps.npy"))  # bit-exact


def checkpoint_step(run_dir: Path) -> int:
    return int(ckpt.load(run_dir / ckpt.CHECKPOINT)["run"]["tracker"]["t"])


@pytest.fixture(scope="module")
def procs():
    ctx = mp.get_context("forkserver")
    # Children fork from a server that imported these once: they start in ~0.3 s, not ~3 s.
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "ocl.experiment", "ocl.learners.linear",
                                "ocl.learners.transformer", "ocl.streams.digits", "sklearn.datasets",
                                "sklearn.model_selection"])
    return ctx


def _wait(pred, proc, timeout=60.0):
    t0 = time.monotonic()
    while not pred():
        if not proc.is_alive() or time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.002)
    return True


@pytest.mark.parametrize("learner", [["learner=linear"], TINY_TRANSFORMER], ids=["linear", "transformer"])
def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path, procs, learner):
    ref = tmp_path / "ref"
    run_experiment(config(tmp_path, *learner, "checkpoint_every=40"), ref)
    run = tmp_path / "run"
    ck = run / ckpt.CHECKPOINT
    args = [*learner, "checkpoint_every=40"]
    rng = np.random.default_rng(0)
    kills = []

    def start(resume):
        # A killable run in a forkserver child (torch already imported there; target and the
        # composed config are pickled by reference/value).
        p = procs.Process(target=run_experiment, args=(config(tmp_path, *args, f"resume={resume}"), str(run)))
        p.start()
        return p

    def kill(p):
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()
            reached = int(np.count_nonzero(np.load(run / "steps.npy")["loss"]))  # records the victim wrote
            kills.append(checkpoint_step(run) if ck.exists() else 0)
            print(f"killed at ~step {reached}, last checkpoint at {kills[-1]}")

    def next_checkpoint(p):
        before = ck.stat().st_mtime_ns
        return _wait(lambda: ck.stat().st_mtime_ns != before, p)

    # 1. the moment the first checkpoint file appears (mid-chunk, maybe mid side-file write)
    p = start(False)
    assert _wait(ck.exists, p)
    kill(p)
    # 2.-3. at a random moment between two checkpoints (or during one) of a resumed run
    for delay in rng.uniform(0.0, 0.05, size=2):
        p = start(True)
        next_checkpoint(p)
        time.sleep(delay)
        kill(p)
    # 4. right after a new checkpoint is renamed into place
    p = start(True)
    next_checkpoint(p)
    kill(p)
    # 5. to the end
    p = start(True)
    p.join(120)
    assert p.exitcode == 0
    print(f"\n{learner[0]}: killed with checkpoints at steps {kills}")
    assert kills[0] > 0 and len(set(kills)) >= 3  # the kills really fell at different points
    same_results(ref, run)


LEARNERS = ["linear", "mlp", "er", "knn", "ncm", "slda", "recent", "avalanche_naive", "avalanche_replay",
            "avalanche_er_ace", "avalanche_gdumb"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("learner", LEARNERS + ["transformer"])
def test_every_learner_resumes_exactly(tmp_path, monkeypatch, learner):
    """Pickling the learner whole restores it exactly, for every learner (in-process crash)."""
    over = [f"learner={learner}", "checkpoint_every=64", "chunk_size=3", "protocol.max_examples=300"]
    if learner == "transformer":
        over += TINY_TRANSFORMER[1:]
    run_experiment(config(tmp_path, *over), tmp_path / "ref")
    real = ckpt.Checkpointer.__call__

    def crashing(self, state):
        real(self, state)
        if state.steps >= 200:  # last checkpoint at 192: the work of steps 193-201 is lost
            raise Crash

    monkeypatch.setattr(ckpt.Checkpointer, "__call__", crashing)
    with pytest.raises(Crash):
        run_experiment(config(tmp_path, *over), tmp_path / "run")
    monkeypatch.setattr(ckpt.Checkpointer, "__call__", real)
    assert checkpoint_step(tmp_path / "run") == 192
    res = run_experiment(config(tmp_path, *over, "resume=true"), tmp_path / "run")
    assert res["resumed"] is True
    same_results(tmp_path / "ref", tmp_path / "run")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_atomic(path, {"format": ckpt.FORMAT, "v": 1})
    good = path.read_bytes()
    for target in ("replace", "fsync"):  # crash before the rename, or while flushing to disk
        def boom(*a, **k):
            raise OSError(f"simulated crash in os.{target}")

        with monkeypatch.context() as m:
            m.setattr(os, target, boom)
            with pytest.raises(StorageError, match="c.pt: simulated crash"):  # one message naming the file
                ckpt.save_atomic(path, {"format": ckpt.FORMAT, "v": 2, "big": torch.zeros(10_000)})
        assert path.read_bytes() == good and ckpt.load(path)["v"] == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temp file left behind


def test_crash_while_checkpointing_a_run_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    over = ["checkpoint_every=100", "protocol.max_examples=300"]
    run_experiment(config(tmp_path, *over), tmp_path / "ref")
    calls = {"n": 0}
    real = os.replace

    def flaky(src, dst):
        if str(dst).endswith(ckpt.CHECKPOINT):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint (step 200) dies before its rename
                raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(StorageError, match=r"disk gone[\s\S]*checkpoint.pt \(at example 100 of 300\), is intact"):
        run_experiment(config(tmp_path, *over), tmp_path / "run")
    monkeypatch.setattr(os, "replace", real)
    assert checkpoint_step(tmp_path / "run") == 100
    run_experiment(config(tmp_path, *over, "resume=true"), tmp_path / "run")
    same_results(tmp_path / "ref", tmp_path / "run")


def test_resume_refusals_change_nothing(tmp_path):
    run = tmp_path / "run"
    run_experiment(config(tmp_path, "protocol.max_examples=100"), run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(OCLError, match="no checkpoint to resume"):
        run_experiment(config(tmp_path, "resume=true"), tmp_path / "empty")
    with pytest.raises(OCLError, match=r"config differs[\s\S]*learner.lr: 1.0 -> 0.5"):
        run_experiment(config(tmp_path, "protocol.max_examples=100", "learner.lr=0.5", "resume=true"), run)
    with pytest.raises(OCLError, match="already holds a checkpoint"):
        run_experiment(config(tmp_path, "protocol.max_examples=100"), run)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # settings that do not change what is computed may differ
    run_experiment(config(tmp_path, "protocol.max_examples=100", "resume=true", "checkpoint_every=7", "threads=2"), run)
    (run / ckpt.CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(OCLError, match="cannot read the checkpoint"):
        run_experiment(config(tmp_path, "protocol.max_examples=100", "resume=true"), run)
    with pytest.raises(OCLError, match="checkpoint_every"):
        run_experiment(config(tmp_path, "checkpoint_every=0"), tmp_path / "r2")


def test_resume_refuses_missing_replay_history(tmp_path):
    over = [*TINY_TRANSFORMER, "protocol.max_examples=60"]
    run_experiment(config(tmp_path, *over), tmp_path / "run")
    (tmp_path / "run" / "replay_history.bin").write_bytes(b"")
    with pytest.raises(OCLError, match="replay history .* missing or shorter"):
        run_experiment(config(tmp_path, *over, "resume=true"), tmp_path / "run")


def test_ctrl_c_checkpoints_and_exits_cleanly_then_resumes(tmp_path):
    """The real CLI: SIGINT mid-run -> checkpoint, a message, exit 130; resume=true finishes."""
    over = ["progress=false", f"cache_dir={tmp_path / 'cache'}", "protocol.max_examples=null", "checkpoint_every=100"]
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-m", "ocl.cli", "run", *over, f"hydra.run.dir={run}"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_file(run / ckpt.CHECKPOINT, p)  # the loop is running (and handling signals)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "SIGINT received" in err and "resume=true" in err and "Traceback" not in err
    stopped = checkpoint_step(run)
    assert 0 < stopped < 1437 and not (run / "results.json").exists()
    q = subprocess.run([sys.executable, "-m", "ocl.cli", "run", *over, f"hydra.run.dir={run}", "resume=true"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    run_experiment(config(tmp_path, "protocol.max_examples=null"), tmp_path / "ref")
    same_results(tmp_path / "ref", run)


def _wait_file(path, proc, timeout=60.0):
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True
