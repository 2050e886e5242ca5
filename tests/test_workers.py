"""``ocl compare workers=N``: runs in spawned worker processes give the serial records."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from ocl.build import Features, learner_config
from ocl.compare import run_compare
from ocl.errors import OCLError
from ocl.streams.base import ArrayImageSet, Source
from ocl.streams.base import LabelSet, labels_only
from ocl.workers import check_workers, run_parallel, slowest_first

TINY = ["protocol.n_tasks=2", "protocol.examples_per_task=40", "plots=false"]
#: Everything in a record that may differ between two runs of the same learner and seed.
TIMINGS = {"examples_per_second", "learn_seconds", "eval_seconds", "wall_seconds"}


def config(tmp_path, *overrides, cache=True):
    cache_dir = f"cache_dir={tmp_path / 'cache'}" if cache else "cache_dir=null"
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name="compare", overrides=["progress=false", cache_dir, *TINY, *overrides])


def strip(rec):
    return {k: v for k, v in rec.items() if k not in TIMINGS}


@pytest.mark.parametrize("cache", [True, False], ids=["cached-features", "no-cache"])
def test_workers_give_the_serial_records_in_the_same_order(tmp_path, cache):
    learners = "learners=[linear,ncm,transformer]"
    serial = run_compare(config(tmp_path, learners, "seeds=2", cache=cache), tmp_path / "serial")
    par = run_compare(config(tmp_path, learners, "seeds=2", "workers=2", cache=cache), tmp_path / "par")
    assert [(r["learner"], r["seed"]) for r in par["records"]] == [
        (n, s) for n in ("linear", "ncm", "transformer") for s in (0, 1)]
    assert all(r["status"] == "ok" for r in par["records"])
    for a, b in zip(serial["records"], par["records"]):
        assert strip(a) == strip(b), (a["learner"], a["seed"])
    assert json.loads((tmp_path / "par" / "compare.json").read_text())["complete"] is True
    # scratch (feature copies, learners' work dirs) is gone
    assert sorted(os.listdir(tmp_path / "par")) == ["compare.csv", "compare.json"]


def test_a_worker_that_dies_fails_its_run_and_the_others_finish(tmp_path, monkeypatch, caplog):
    # A learner that kills its own process, as the kernel's OOM killer would. It must be
    # importable in a spawned worker: a module on sys.path (spawn passes sys.path on).
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "dying_learner.py").write_text(textwrap.dedent("""
        import os, pathlib, signal, time
        from ocl.learners.ncm import NCMLearner

        DYING = pathlib.Path(__file__).with_name("dying_started")
        SLOW = pathlib.Path(__file__).with_name("slow_started")

        def wait_for(flag):
            t0 = time.monotonic()
            while not flag.exists() and time.monotonic() - t0 < 60:
                time.sleep(0.05)

        class Dying(NCMLearner):
            def update(self, x, y):
                wait_for(SLOW)  # die only while Slow runs in the other worker
                DYING.touch()
                os.kill(os.getpid(), signal.SIGKILL)

        class Slow(NCMLearner):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                SLOW.touch()
                wait_for(DYING)
                time.sleep(2)  # still busy when the parent sees the pool break
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    cfg = config(tmp_path, "learners=[slow,dying,ncm,linear]", "workers=2",
                 "+learner_options.dying._target_=dying_learner.Dying",
                 "+learner_options.slow._target_=dying_learner.Slow")
    payload = run_compare(cfg, tmp_path / "r")
    by = {r["learner"]: r for r in payload["records"]}
    assert list(by) == ["slow", "dying", "ncm", "linear"]
    assert by["dying"]["status"] == "failed" and "worker process died" in by["dying"]["error"]
    # `slow` was under way in the other worker when the pool broke: rerun alone, not failed
    assert "one at a time, to find the one that killed it: slow seed 0, dying seed 0" in caplog.text
    assert all(by[n]["status"] == "ok" for n in ("slow", "ncm", "linear"))
    assert not [p for p in os.listdir(tmp_path / "r") if p.startswith(".")]


def test_slowest_learners_start_first_and_records_keep_the_compare_order(tmp_path, monkeypatch):
    jobs = [(n, s) for n in ("linear", "mine", "ncm", "transformer", "knn") for s in (0, 1)]
    assert slowest_first(jobs) == [("transformer", 0), ("transformer", 1), ("knn", 0), ("knn", 1),
                                   ("linear", 0), ("linear", 1), ("mine", 0), ("mine", 1), ("ncm", 0), ("ncm", 1)]
    # what the pool is given, and in which order (the pool starts its jobs in that order)
    submitted = []

    def fake_pool(ship, level, jobs, workers):
        submitted.extend(jobs)
        for name, seed in jobs:
            yield {"learner": name, "seed": seed, "status": "ok"}
        return [], []

    monkeypatch.setattr("ocl.workers._pool", fake_pool)
    src = Source("s", ArrayImageSet(np.zeros((4, 2), np.float32), np.arange(4) % 2), None, ["a", "b"])
    feats = Features(src, None, np.zeros((4, 2), np.float32), None, 0.0)
    cfg = config(tmp_path, "learners=[linear,ncm,transformer]", "seeds=2", "workers=2")
    nodes = {n: learner_config(n) for n in ("linear", "ncm", "transformer")}
    recs = list(run_parallel(cfg, feats, nodes, [(n, s) for n in nodes for s in (0, 1)], tmp_path, 2))
    assert submitted == [("transformer", 0), ("transformer", 1), ("linear", 0), ("linear", 1), ("ncm", 0),
                         ("ncm", 1)]
    assert [(r["learner"], r["seed"]) for r in recs] == submitted


def test_bad_workers_values_are_clear_errors(tmp_path):
    for bad in (0, -1, True, "2", 1.5):
        with pytest.raises(OCLError, match="workers="):
            check_workers(bad)
    assert check_workers(3) == 3
    with pytest.raises(OCLError, match="workers=0"):
        run_compare(config(tmp_path, "learners=[linear]", "workers=0"), tmp_path / "r")
    assert not (tmp_path / "cache").exists()  # refused before extracting anything


def test_labels_only_source_keeps_labels_and_fingerprints_but_no_images():
    rng = np.random.default_rng(0)
    src = Source("s", ArrayImageSet(rng.integers(0, 255, (6, 4, 4, 1)), np.arange(6) % 3),
                 ArrayImageSet(rng.integers(0, 255, (3, 4, 4, 1)), np.arange(3)), ["a", "b", "c"])
    light = labels_only(src)
    assert isinstance(light.train, LabelSet) and isinstance(light.test, LabelSet)
    np.testing.assert_array_equal(light.train.labels, src.train.labels)
    np.testing.assert_array_equal(light.test.labels, src.test.labels)
    assert light.train.fingerprint() == src.train.fingerprint() and light.classes == ["a", "b", "c"]
    with pytest.raises(OCLError, match="workers=1"):
        light.train.get(np.arange(2))


def test_a_script_without_main_guard_fails_clearly_instead_of_looping(tmp_path):
    # spawn re-imports the main script in each worker; unguarded, the workers die on start-up.
    # The comparison must end with a message saying so, not respawn workers forever.
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from hydra import compose, initialize_config_module
        from ocl.compare import run_compare
        with initialize_config_module(config_module="ocl.configs", version_base=None):
            cfg = compose(config_name="compare", overrides={["progress=false", "cache_dir=null", *TINY,
                                                             "learners=[ncm,recent]", "workers=2"]!r})
        run_compare(cfg, {str(tmp_path / "r")!r})
    """))
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=300, capture_output=True)
    recs = json.loads((tmp_path / "r" / "compare.json").read_text())["records"]
    assert [r["status"] for r in recs] == ["failed", "failed"]
    assert 'if __name__ == "__main__":' in recs[0]["error"]


def test_ctrl_c_stops_a_parallel_compare_keeps_finished_runs_and_leaves_no_workers(tmp_path):
    """The real CLI, interrupted as a terminal does it: SIGINT to the whole process group."""
    import signal
    import time

    run = tmp_path / "run"
    # ~10 s of transformer on the digits stream: still running when the linear record lands.
    args = [sys.executable, "-m", "ocl.cli", "compare", "progress=false", "plots=false", f"cache_dir={tmp_path / 'c'}",
            "learners=[linear,transformer]", "workers=2", f"hydra.run.dir={run}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    t0 = time.monotonic()
    while not (run / "compare.json").exists() and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1]
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    payload = json.loads((run / "compare.json").read_text())
    assert payload["complete"] is False
    assert [(r["learner"], r["status"]) for r in payload["records"]] == [("linear", "ok")]
    assert "Process SpawnProcess" not in err  # workers leave Ctrl-C to the parent: no worker tracebacks
    assert "leaked" not in err  # no resource-tracker warnings about the terminated workers
    t0 = time.monotonic()  # no worker outlives the command (terminated ones may linger as zombies briefly)
    while _group_alive(p.pid) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert not _group_alive(p.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    """SIGKILL to the parent alone (no signal reaches the workers): its workers notice within a
    second or two and exit, instead of running their jobs to the end for nobody."""
    import signal
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "ocl.cli", "compare", "progress=false", "plots=false", f"cache_dir={tmp_path / 'c'}",
            "learners=[linear,transformer]", "workers=2", f"hydra.run.dir={run}"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    t0 = time.monotonic()
    while not (run / "compare.json").exists() and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.05)  # the linear record landed: the transformer's worker is mid-run
    assert p.poll() is None
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    t0 = time.monotonic()  # the watchdog polls every second; the transformer run alone would take ~10 s more
    while _group_alive(p.pid) and time.monotonic() - t0 < 4:
        time.sleep(0.1)
    alive = _group_alive(p.pid)
    if alive:
        os.killpg(p.pid, signal.SIGKILL)
    assert not alive, "a worker outlived its killed parent"
