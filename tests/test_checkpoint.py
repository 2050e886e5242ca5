"""Checkpoint and resume: a run killed at any point and resumed ends exactly like an
uninterrupted run; checkpoint writes are atomic; resume refuses what it cannot continue."""

import errno
import json
import multiprocessing as mp
import os
import re
import shutil
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
from ocl.run import run_experiment

# Keys that legitimately differ between an uninterrupted and a resumed run.
VOLATILE = {"examples_per_second", "learn_seconds", "eval_seconds", "feature_seconds", "near_future_seconds", "host",
            "config", "resumed", "threads"}
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
    # near-future evaluations (on by default), record by record
    assert a["near_future_evaluations"] > 0
    assert (ref_dir / "near_future.csv").read_bytes() == (run_dir / "near_future.csv").read_bytes()


def checkpoint_step(run_dir: Path) -> int:
    return int(ckpt.load(run_dir / ckpt.CHECKPOINT)["run"]["tracker"]["t"])


@pytest.fixture(scope="module")
def procs():
    ctx = mp.get_context("forkserver")
    # Children fork from a server that imported these once: they start in ~0.3 s, not ~3 s.
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "ocl.run", "ocl.learners.linear",
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


LEARNERS = ["linear", "mlp", "er", "knn", "ncm", "slda", "ranpac", "randumb", "recent", "avalanche_naive", "avalanche_replay",
            "avalanche_er_ace", "avalanche_gdumb", "readout_pool"]
#: The default learner with a tiny network: the pool, its held-out past and the network's replay
#: history are side files in the run directory.
TINY_POOLED = ["learner=pooled", "learner.experts=[{name:transformer,d_model:16,window:4,replay_streams:2},linear,slda]"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("learner", LEARNERS + ["transformer", "pooled"])
def test_every_learner_resumes_exactly(tmp_path, monkeypatch, learner):
    """Pickling the learner whole restores it exactly, for every learner (in-process crash)."""
    # near-future evaluation after every chunk that holds a 4th step, on step end + 7: records
    # made before the crash (and lost with steps 193-201) must come out the same after resume
    over = [f"learner={learner}", "checkpoint_every=64", "chunk_size=3", "protocol.max_examples=300",
            "near_future.offset=7", "near_future.every=4"]
    if learner == "transformer":
        over += TINY_TRANSFORMER[1:]
    if learner == "pooled":
        over += TINY_POOLED[1:]
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


def test_a_checkpoint_of_an_older_format_is_refused_with_a_message_saying_so(tmp_path):
    """Learner classes move between versions (a checkpoint pickles them by module path): an
    older checkpoint is refused by its header's format, before anything is unpickled."""
    path = tmp_path / ckpt.CHECKPOINT
    data = ckpt.dumps({"format": ckpt.FORMAT - 1}, tmp_path).replace(
        f'"format": {ckpt.FORMAT}'.encode(), f'"format": {ckpt.FORMAT - 1}'.encode(), 1)
    path.write_bytes(data)
    with pytest.raises(OCLError, match=f"older version of ocl .checkpoint format {ckpt.FORMAT - 1}") as e:
        ckpt.load(path)
    assert "copy read-out" in str(e.value)  # what changed last


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
    files = lambda: {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    with pytest.raises(OCLError, match="no checkpoint to resume"):
        run_experiment(config(tmp_path, "resume=true"), tmp_path / "empty")
    with pytest.raises(OCLError, match=r"config differs[\s\S]*learner.heldout_lag: 100 -> 5"):
        run_experiment(config(tmp_path, "protocol.max_examples=100", "learner.heldout_lag=5", "resume=true"), run)
    with pytest.raises(OCLError, match=r"config differs[\s\S]*near_future.every: 20 -> None"):
        run_experiment(config(tmp_path, "protocol.max_examples=100", "near_future.every=null", "resume=true"), run)
    with pytest.raises(OCLError, match="already holds a checkpoint"):
        run_experiment(config(tmp_path, "protocol.max_examples=100"), run)
    assert files() == before
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


def _wait_file(path, proc, timeout=180.0):  # generous: a loaded CI machine starts torch slowly
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------------ verified checkpoints, self-contained run dirs

CRASH_OVER = [*TINY_TRANSFORMER, "checkpoint_every=64", "chunk_size=3", "protocol.max_examples=300"]


def _crash_at(steps):
    real = ckpt.Checkpointer.__call__

    def crashing(self, state):
        real(self, state)
        if state.steps >= steps:
            raise Crash

    return crashing


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A tiny transformer run that crashed after its checkpoint at step 192, and the same run
    uninterrupted (``ref``)."""
    base = tmp_path_factory.mktemp("crashed")
    run_experiment(config(base, *CRASH_OVER), base / "ref")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ckpt.Checkpointer, "__call__", _crash_at(200))
        with pytest.raises(Crash):
            run_experiment(config(base, *CRASH_OVER), base / "run")
    assert checkpoint_step(base / "run") == 192
    return base


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def resume_cli(base: Path, run_dir: Path, monkeypatch, capsys):
    """``ocl run <the crashed run's overrides> resume=true`` in-process: (exit code, stderr)."""
    from ocl.cli import main

    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    code = 0
    try:
        main(["run", "progress=false", f"cache_dir={base / 'cache'}", *BASE, *CRASH_OVER, "resume=true",
              f"hydra.run.dir={run_dir}"])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _flip_head_weight(run: Path) -> None:
    path = run / ckpt.CHECKPOINT
    w = ckpt.load(path)["learner"].model.head.weight.detach().numpy()
    raw = bytearray(path.read_bytes())
    at = raw.find(w.tobytes()[:64]) + 4 * 3 + 3  # the exponent byte of head.weight[0, 3]
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


def _edit_history(run: Path, byte: int) -> None:
    rec = 64 * 4 + 8  # digits: D = 64 float32 + an int64 label
    raw = bytearray((run / "replay_history.bin").read_bytes())
    raw[10 * rec + byte] ^= 0x01
    (run / "replay_history.bin").write_bytes(bytes(raw))


def _edit_steps(run: Path) -> None:
    rec = np.load(run / "steps.npy", mmap_mode="r+")
    rec[5]["pred"] = (rec[5]["label"] + 1) % 10
    rec[6]["loss"] = 0.0
    rec.flush()


@pytest.mark.parametrize("damage,expect", [
    (_flip_head_weight, r"checkpoint.pt: the checkpoint is corrupt \(its sha256 differs"),
    (lambda run: _edit_history(run, 4 * 5), r"replay_history.bin \(the replay history\) changed after the checkpoint"),
    (lambda run: _edit_history(run, 64 * 4 + 1), r"replay_history.bin \(the replay history\) changed after"),  # a label
    (_edit_steps, r"steps.npy \(the per-step records\) changed after the checkpoint"),
], ids=["checkpoint-tensor-byte", "history-float", "history-label-byte", "steps-rows"])
def test_resume_refuses_damaged_checkpoint_or_side_file(crashed, tmp_path, monkeypatch, capsys, damage, expect):
    """Each of these used to resume with exit 0 and different results (the label byte: an IndexError)."""
    run = tmp_path / "run"
    shutil.copytree(crashed / "run", run)
    damage(run)
    before = tree(run)
    code, err = resume_cli(crashed, run, monkeypatch, capsys)
    assert code == 2 and re.search(expect, err) and "Traceback" not in err, err
    assert "start the run afresh in a new directory" in err or "Start a new run in another directory" in err
    assert tree(run) == before  # nothing written: not the checkpoint, not a side file, not .hydra/


def test_a_copied_run_directory_resumes_into_its_own_files(crashed, tmp_path, monkeypatch, capsys):
    """The checkpoint used to hold the absolute path of the replay history: a copy resumed into
    the original's file, and failed once the original was gone."""
    copy = tmp_path / "copy"
    shutil.copytree(crashed / "run", copy)
    original = tmp_path / "original"
    shutil.copytree(crashed / "run", original)
    untouched = tree(original)
    shutil.move(str(crashed / "run"), str(tmp_path / "moved-away"))  # the directory the checkpoint was written in
    try:
        code, err = resume_cli(crashed, copy, monkeypatch, capsys)
        assert code == 0, err
        same_results(crashed / "ref", copy)
        assert tree(original) == untouched
    finally:
        shutil.move(str(tmp_path / "moved-away"), str(crashed / "run"))


def test_disk_full_in_a_side_file_says_where_and_keeps_the_last_checkpoint(crashed, tmp_path, monkeypatch, capsys):
    """ENOSPC while appending to the replay history (simulated: os.pwrite fails once the history
    passes 250 examples): one message with the path, the bytes needed and the intact checkpoint;
    after "freeing space" the run resumes to the uninterrupted results."""
    run = tmp_path / "run"
    real_pwrite = os.pwrite
    saved = {}

    def full_disk(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("replay_history.bin") and offset >= 250 * (64 * 4 + 8):
            saved["checkpoint"] = (run / ckpt.CHECKPOINT).read_bytes()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    from ocl.cli import main

    monkeypatch.setattr(os, "pwrite", full_disk)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["run", "progress=false", f"cache_dir={crashed / 'cache'}", *BASE, *CRASH_OVER, f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert e.value.code == 2 and "Traceback" not in err
    assert f"no space left on the device of {run / 'replay_history.bin'} while writing the replay history" in err
    assert re.search(r"\(\d[\d,]* bytes were needed, [\d,]+ bytes are free\)", err)
    assert f"The last checkpoint, {run / ckpt.CHECKPOINT} (at example 192 of 300), is intact" in err
    assert "resume=true" in err and (run / ckpt.CHECKPOINT).read_bytes() == saved["checkpoint"]
    code, err = resume_cli(crashed, run, monkeypatch, capsys)
    assert code == 0, err
    same_results(crashed / "ref", run)


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    """ENOSPC reported when the new checkpoint is flushed (simulated in os.fsync): the message
    gives the checkpoint's size, the old checkpoint and no temp file remain."""
    from ocl.cli import main

    over = ["checkpoint_every=100", "protocol.max_examples=300"]
    real_fsync = os.fsync
    calls = {"n": 0}

    def full_disk(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == 2:  # the checkpoint at step 200
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["run", "progress=false", f"cache_dir={tmp_path / 'cache'}", *BASE, *over, f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "inline_container" not in err
    assert re.search(rf"no space left on the device of {re.escape(str(run / ckpt.CHECKPOINT))} while writing the "
                     r"checkpoint \([\d,]+ bytes were needed", err)
    assert "(at example 100 of 300), is intact" in err
    assert checkpoint_step(run) == 100 and not list(run.glob(".*.tmp"))


def test_a_run_extracting_its_features_as_it_goes_resumes_exactly(tmp_path, monkeypatch, rowmeans_backbone):
    """A cached backbone on an empty cache: the features are extracted in the background as the
    run goes (ocl.streams.prefetch); a crash keeps the shards, and the resumed run, extracting
    what is missing, ends exactly like an uninterrupted one."""
    over = ["learner=ncm", "checkpoint_every=64", "chunk_size=3", "protocol.max_examples=300",
            "near_future.offset=7", "near_future.every=4", f"backbone._target_={rowmeans_backbone}"]
    run_experiment(config(tmp_path / "a", *over), tmp_path / "ref")
    real = ckpt.Checkpointer.__call__

    def crashing(self, state):
        real(self, state)
        if state.steps >= 200:
            raise Crash

    monkeypatch.setattr(ckpt.Checkpointer, "__call__", crashing)
    with pytest.raises(Crash):
        run_experiment(config(tmp_path / "b", *over), tmp_path / "run")
    monkeypatch.setattr(ckpt.Checkpointer, "__call__", real)
    assert list((tmp_path / "b" / "cache").glob("*/rows/*.json"))  # the crash kept the shards
    res = run_experiment(config(tmp_path / "b", *over, "resume=true"), tmp_path / "run")
    assert res["resumed"] is True
    same_results(tmp_path / "ref", tmp_path / "run")
