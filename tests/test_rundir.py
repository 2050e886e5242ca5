"""A run directory belongs to one process at a time, and a refused command changes nothing in
it (``.hydra/`` and the log file included); leftovers of an interrupted write are removed by
the next run that commits. The CLI is called in-process (``ocl.cli.main``) where that is
faithful; the other owner is a real second process."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ocl import rundir
from ocl.cli import main
from ocl.errors import OCLError

HOLD = """import sys, time
from ocl.rundir import claim
with claim(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def tree(*dirs: Path) -> dict[str, bytes]:
    """Every file under ``dirs`` with its bytes (what a refused command must leave as it was)."""
    return {str(p): p.read_bytes() for d in dirs if d.exists() for p in sorted(d.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def held_elsewhere(path: Path):
    """Another process owns ``path`` for the block; yields its PID."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p.pid
    finally:
        p.send_signal(signal.SIGINT)  # a clean exit: the claim ends and removes its lock file
        p.wait(30)


def ocl(monkeypatch, capsys, *args):
    """``ocl ARGS`` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def finished(tmp_path):
    """A run directory holding a finished tiny run (results, checkpoint, .hydra/, log)."""
    run = tmp_path / "run"
    args = ["run", "progress=false", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}",
            "protocol.max_examples=60", "protocol.n_tasks=2"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "argv", sys.argv[:1])
        main(args)
    names = {p.name for p in run.iterdir()}
    assert {".hydra", "checkpoint.pt", "ocl.log", "results.json", "steps.csv", "steps.npy"} <= names
    assert rundir.LOCK not in names and not any(n.endswith(".tmp") for n in names)  # nothing left once over
    return run, args


def test_second_process_is_refused_with_the_holders_pid(finished, monkeypatch, capsys):
    run, args = finished
    before = tree(run)
    with held_elsewhere(run) as pid:
        code, out, err = ocl(monkeypatch, capsys, *args, "resume=true")
        assert code == 2 and f"is in use by another ocl process (PID {pid} on " in err and "Traceback" not in err
        assert str(run) in err and "hydra.run.dir=DIR" in err
        code, _, err = ocl(monkeypatch, capsys, "compare", "progress=false", f"hydra.run.dir={run}",
                           "learners=[linear]", "plots=false")
        assert code == 2 and f"PID {pid}" in err
    assert tree(run) == before  # results, checkpoint, .hydra/, log: byte for byte
    code, _, err = ocl(monkeypatch, capsys, *args, "resume=true")  # the holder has gone: free again
    assert code == 0, err


def test_lock_dies_with_a_killed_holder(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "d")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(OCLError, match=f"PID {p.pid}"):
        with rundir.claim(tmp_path / "d"):
            pass
    p.kill()
    p.wait()
    assert (tmp_path / "d" / rundir.LOCK).exists()  # a stale file, no lock: the next claim takes over
    with rundir.claim(tmp_path / "d") as rd:
        rd.commit()
        assert json.loads((tmp_path / "d" / rundir.LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "d" / rundir.LOCK).exists()


def test_claims_nest_within_a_process_and_a_refused_claim_leaves_no_trace(tmp_path):
    d = tmp_path / "new"
    with rundir.claim(d) as outer:
        with rundir.claim(d) as inner:
            assert inner is outer and rundir.held(d) is outer
    assert not d.exists()  # created for a claim that never committed: removed again
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / rundir.LOCK).write_text("left by a killed run\n")
    with rundir.claim(tmp_path / "old"):
        pass
    assert (tmp_path / "old" / rundir.LOCK).read_text() == "left by a killed run\n"


@pytest.mark.parametrize("bad", ["seed=-1", "learner.lr=nan", "protocol.n_tasks=0"])
def test_a_refused_run_changes_nothing_in_its_directory(finished, monkeypatch, capsys, bad):
    """Hydra used to rewrite .hydra/ (and append to the log) before any check ran."""
    run, args = finished
    (run / ".steps.csv.x1y2z3.tmp").write_text("half a file")  # an interrupted final write
    before = tree(run)
    code, _, err = ocl(monkeypatch, capsys, *args, bad)
    assert code == 2 and "error: " in err and "Traceback" not in err
    assert tree(run) == before and not (run / rundir.LOCK).exists()
    fresh = run.parent / "fresh"
    code, _, _ = ocl(monkeypatch, capsys, *args[:3], f"hydra.run.dir={fresh}", bad)
    assert code == 2 and not fresh.exists()  # a directory made only for a refused run is removed


def test_leftover_temp_files_are_removed_by_the_next_run(finished, monkeypatch, capsys):
    run, args = finished
    results = (run / "results.json").read_bytes()
    leftovers = [run / ".steps.csv.abc123.tmp", run / ".results.json.q1w2e3.tmp", run / ".checkpoint.pt.zz.tmp"]
    for p in leftovers:
        p.write_text("interrupted")
    (run / ".work-linear-seed0-k9.tmp").mkdir()  # a compare worker's scratch
    code, _, err = ocl(monkeypatch, capsys, *args, "resume=true")
    assert code == 0, err
    assert not any(p.exists() for p in leftovers) and not (run / ".work-linear-seed0-k9.tmp").exists()
    volatile = {"resumed", "examples_per_second", "learn_seconds", "eval_seconds", "feature_seconds", "config"}
    again = json.loads((run / "results.json").read_text())
    assert {k: v for k, v in again.items() if k not in volatile} == {
        k: v for k, v in json.loads(results).items() if k not in volatile}
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert "resume=true" in overrides  # the committed resume recorded its own invocation
