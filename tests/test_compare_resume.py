"""``ocl compare ... resume=true``: an interrupted comparison resumed in its directory runs only
what is missing and ends with the records an uninterrupted one writes (digits, pixels, 2 tasks
x 40 examples: ~0.1 s per run)."""

import csv
import json

import numpy as np
import pytest
from hydra import compose, initialize_config_module

import ocl.compare as compare
from ocl.compare import run_compare
from ocl.errors import OCLError
from ocl.jobs import failed_record

TINY = ["protocol.n_tasks=2", "protocol.examples_per_task=40"]
#: Everything in a record that may differ between two runs of the same learner and seed.
TIMINGS = {"examples_per_second", "learn_seconds", "eval_seconds", "wall_seconds"}
LEARNERS = "learners=[linear,ncm,recent]"


def config(tmp_path, *overrides):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name="compare", overrides=["progress=false", f"cache_dir={tmp_path / 'cache'}",
                                                         *TINY, *overrides])


def strip(rec):
    return {k: v for k, v in rec.items() if k not in TIMINGS}


def saved(run_dir):
    return json.loads((run_dir / "compare.json").read_text())


def csv_rows(run_dir):
    with open(run_dir / "compare.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


@pytest.fixture
def runs(monkeypatch):
    """The (learner, seed) runs :func:`ocl.jobs.run_guarded` starts in this process; set
    ``runs.stop_after = k`` to interrupt the comparison (Ctrl-C) when run k+1 would start,
    ``runs.fail = {(learner, seed)}`` to make those runs fail."""
    real = compare.run_guarded

    class Runs(list):
        stop_after = None
        fail: set = set()

    started = Runs()

    def spy(cfg, feats, name, seed, *args, **kwargs):
        if started.stop_after is not None and len(started) == started.stop_after:
            raise KeyboardInterrupt
        started.append((name, seed))
        if (name, seed) in started.fail:
            rec = failed_record(name, seed, "RuntimeError: injected")
            rec["wall_seconds"] = 0.0
            return rec
        return real(cfg, feats, name, seed, *args, **kwargs)

    monkeypatch.setattr(compare, "run_guarded", spy)
    return started


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, runs):
    whole = run_compare(config(tmp_path, LEARNERS, "seeds=2"), tmp_path / "whole")
    assert len(runs) == 6
    runs.clear()

    runs.stop_after = 4  # Ctrl-C as the 5th run starts: 4 finished runs on disk
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_compare(config(tmp_path, LEARNERS, "seeds=2"), part)
    before = saved(part)
    assert before["complete"] is False and len(before["records"]) == 4
    runs.clear()
    runs.stop_after = None

    resumed = run_compare(config(tmp_path, LEARNERS, "seeds=2", "resume=true"), part)
    assert runs == [("recent", 0), ("recent", 1)]  # only the missing runs ran
    after = saved(part)
    assert after["complete"] is True
    assert [strip(r) for r in after["records"]] == [strip(r) for r in saved(tmp_path / "whole")["records"]]
    assert after["records"][:4] == before["records"]  # the kept runs' records, timings included: not rerun
    assert [strip(r) for r in resumed["records"]] == [strip(r) for r in whole["records"]]
    assert csv_rows(part) == csv_rows(tmp_path / "whole")
    assert [row["learner"] for row in after["summary"]] == [row["learner"] for row in whole["summary"]]
    for png in ("curves.png", "acc_matrix.png"):
        assert (part / png).read_bytes() == (tmp_path / "whole" / png).read_bytes(), png

    runs.clear()  # resuming a finished comparison runs nothing and rewrites the same results
    run_compare(config(tmp_path, LEARNERS, "seeds=2", "resume=true"), part)
    assert runs == [] and saved(part)["records"] == after["records"]


def test_resume_with_workers_reruns_failed_runs_only(tmp_path, runs):
    whole = run_compare(config(tmp_path, LEARNERS, "seeds=2", "plots=false"), tmp_path / "whole")
    runs.clear()
    runs.fail = {("ncm", 1), ("recent", 0)}
    first = run_compare(config(tmp_path, LEARNERS, "seeds=2", "plots=false"), tmp_path / "r")
    assert [r["status"] for r in first["records"]] == ["ok", "ok", "ok", "failed", "failed", "ok"]
    runs.clear()

    # workers=2 (spawned processes, which this test's spy does not reach) may differ on resume;
    # the two failed runs run again there, the four others are kept as they were
    run_compare(config(tmp_path, LEARNERS, "seeds=2", "plots=false", "workers=2", "resume=true"), tmp_path / "r")
    assert runs == []
    after = saved(tmp_path / "r")
    assert after["complete"] is True and all(r["status"] == "ok" for r in after["records"])
    assert [strip(r) for r in after["records"]] == [strip(r) for r in whole["records"]]
    for i in (0, 1, 2, 5):
        assert after["records"][i]["wall_seconds"] == first["records"][i]["wall_seconds"]


def test_a_changed_config_is_refused_and_nothing_changes(tmp_path, runs):
    run_dir = tmp_path / "r"
    run_compare(config(tmp_path, LEARNERS, "plots=false"), run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    runs.clear()
    with pytest.raises(OCLError, match=r"config differs.*\n  protocol.examples_per_task: 40 -> 30\n.*another "
                                       r"directory") as e:
        run_compare(config(tmp_path, LEARNERS, "plots=false", "resume=true", "protocol.examples_per_task=30"),
                    run_dir)
    assert "learners" not in str(e.value)
    with pytest.raises(OCLError, match=r"near_future.every: 20 -> 10"):
        run_compare(config(tmp_path, LEARNERS, "plots=false", "resume=true", "near_future.every=10"), run_dir)
    # without resume=true an earlier comparison is not overwritten
    with pytest.raises(OCLError, match=r"already holds the results of an earlier comparison.*resume=true"):
        run_compare(config(tmp_path, LEARNERS, "plots=false"), run_dir)
    # leaving out a finished run would drop its result
    with pytest.raises(OCLError, match=r"leave out \(recent seed 0\)"):
        run_compare(config(tmp_path, "learners=[linear,ncm]", "plots=false", "resume=true"), run_dir)
    assert runs == []
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_learners_and_seeds_may_grow_and_a_changed_learner_reruns(tmp_path, runs, caplog):
    run_dir = tmp_path / "r"
    run_compare(config(tmp_path, "learners=[linear,ncm]", "plots=false"), run_dir)
    runs.clear()
    # more seeds, one more learner, in another order: only the new runs run, records in the new table order
    grown = run_compare(config(tmp_path, "learners=[recent,linear,ncm]", "seeds=2", "plots=false", "resume=true"),
                        run_dir)
    assert sorted(runs) == [("linear", 1), ("ncm", 1), ("recent", 0), ("recent", 1)]
    fresh = run_compare(config(tmp_path, "learners=[recent,linear,ncm]", "seeds=2", "plots=false"), tmp_path / "f")
    assert [strip(r) for r in grown["records"]] == [strip(r) for r in fresh["records"]]
    runs.clear()
    # a learner's options changed: its runs are stale and run again, the others are kept
    with caplog.at_level("WARNING", logger="ocl.compare_resume"):
        run_compare(config(tmp_path, "learners=[recent,linear,ncm]", "seeds=2", "plots=false", "resume=true",
                           "+learner_options.recent.window=7"), run_dir)
    assert runs == [("recent", 0), ("recent", 1)]
    assert "config of recent changed" in caplog.text and "window" in caplog.text
    runs.clear()
    # `ocl run`'s learner group (not used by compare; its default changed once) may differ
    run_compare(config(tmp_path, "learners=[recent,linear,ncm]", "seeds=2", "plots=false", "resume=true",
                       "+learner_options.recent.window=7", "learner=ncm"), run_dir)
    assert runs == []
    assert [r["learner_config"].get("window") for r in saved(run_dir)["records"][:2]] == [7, 7]


def test_changed_data_behind_the_same_path_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"

    def write(x):
        np.savez(path, x_train=x, y_train=np.arange(60) % 3, x_test=x[:30], y_test=np.arange(30) % 3)

    write(rng.normal(size=(60, 5)).astype(np.float32))
    over = ["stream=arrays", f"stream.path={path}", "protocol=iid", "learners=[ncm]", "plots=false"]
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose(config_name="compare", overrides=["progress=false", "cache_dir=null", *over])
        again = compose(config_name="compare", overrides=["progress=false", "cache_dir=null", *over, "resume=true"])
    run_compare(cfg, tmp_path / "r")
    run_compare(again, tmp_path / "r")  # same data: nothing to do
    write(rng.normal(size=(60, 5)).astype(np.float32))
    with pytest.raises(OCLError, match=r"config matches, but the data .* differ"):
        run_compare(again, tmp_path / "r")


def test_unreadable_compare_json_is_a_clear_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "compare.json").write_text("{not json")
    with pytest.raises(OCLError, match=r"cannot resume from .*compare.json: not readable as JSON"):
        run_compare(config(tmp_path, "learners=[ncm]", "resume=true"), tmp_path / "r")
    (tmp_path / "r" / "compare.json").write_text("[1, 2]")
    with pytest.raises(OCLError, match=r"not the results of an ocl comparison"):
        run_compare(config(tmp_path, "learners=[ncm]", "resume=true"), tmp_path / "r")


def test_resume_true_in_a_new_directory_runs_everything(tmp_path, runs):
    run_compare(config(tmp_path, "learners=[ncm]", "seeds=2", "plots=false", "resume=true"), tmp_path / "new")
    assert runs == [("ncm", 0), ("ncm", 1)] and saved(tmp_path / "new")["complete"] is True


def test_free_keys_include_how_features_are_computed_not_which():
    from ocl.checkpoint import config_differences
    from ocl.compare_resume import FREE_KEYS

    before = {"workers": 1, "backbone": {"threads": 1, "batch_size": 64, "image_size": 128}, "protocol": {"stay": 0.9}}
    after = {"workers": 2, "backbone": {"threads": 2, "batch_size": 32, "image_size": 224}, "protocol": {"stay": 0.9}}
    assert config_differences(before, after, FREE_KEYS) == ["backbone.image_size: 128 -> 224"]
