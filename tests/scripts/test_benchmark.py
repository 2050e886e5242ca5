"""scripts/benchmark.py end to end on a tiny stand-in for the benchmark: two experiments of our
own on digits (pixels), 200 examples, 2 learners, 1 seed; then again, which must rerun nothing."""

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def setup(tmp_path):
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "tiny_split.yaml").write_text("# @package _global_\nprotocol:\n  n_tasks: 2\nseeds: 3\n")
    (conf / "tiny_iid.yaml").write_text("# @package _global_\ndefaults:\n  - override /protocol: iid\nseeds: 3\n")
    args = ["--config-dir", str(tmp_path / "conf"), "--streams", "tiny_split", "tiny_iid", "--learners", "ncm,linear",
            "--seeds", "1", "--max-examples", "200", "--workers", "1", "--out", str(tmp_path / "out"),
            "--", "progress=false", f"cache_dir={tmp_path / 'cache'}"]
    return tmp_path, args


def bench(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def records(out):
    return {s: json.loads((out / s / "compare.json").read_text())["records"] for s in ("tiny_split", "tiny_iid")}


def test_benchmark_runs_combines_and_reruns_nothing(setup):
    tmp_path, args = setup
    first = bench(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = tmp_path / "out" / "results"  # --max-examples: never over the committed table
    assert sorted(p.name for p in results.iterdir()) == ["benchmark.csv", "benchmark.md", "records",
                                                         "tiny_iid_curves.png", "tiny_split_curves.png"]
    assert sorted(p.name for p in (results / "records").iterdir()) == ["tiny_iid.json", "tiny_split.json"]
    with open(results / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stream"], r["learner"]) for r in rows if r["learner"] == "linear"] == [("tiny_split", "linear"),
                                                                                       ("tiny_iid", "linear")]
    assert sorted((r["stream"], r["learner"]) for r in rows) == sorted(
        (s, n) for s in ("tiny_split", "tiny_iid") for n in ("linear", "ncm"))
    assert {c for c in rows[0] if c.endswith("_mean")} == {
        "avg_online_accuracy_mean", "near_future_accuracy_mean", "mean_log_loss_mean", "final_avg_accuracy_mean",
        "forgetting_mean", "examples_per_second_mean"}
    for r in rows:
        assert (r["seeds_ok"], r["seeds"]) == ("1", "1") and 0 < float(r["avg_online_accuracy_mean"]) <= 1
        assert r["avg_online_accuracy_std"] == ""  # one seed: no spread
    md = (results / "benchmark.md").read_text()
    assert first.stdout.endswith(md + "\n")  # after the tables of the two ocl compare runs
    glance = md.split("## Online accuracy")[1].split("##")[0]
    assert "| learner | tiny_split | tiny_iid |" in glance and glance.count("**") == 4  # one best per stream
    table = md.split("## Every metric")[1]
    assert table.count("| tiny_split |") == 2 and table.count("| tiny_iid |") == 2
    assert "Smoke run: every stream cut to 200 examples" in md
    before = records(tmp_path / "out")
    assert all(len(v) == 2 and all(r["n_examples"] == 200 for r in v) for v in before.values())

    second = bench(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("0 to run") == 2
    assert records(tmp_path / "out") == before  # timings included: nothing ran again
    assert (results / "benchmark.md").read_text() == md

    # --combine-only rebuilds from the run directories without starting ocl compare
    (results / "benchmark.md").unlink()
    third = bench(*args[:-3], "--combine-only")
    assert third.returncode == 0 and "ocl.cli compare" not in third.stderr
    rebuilt = (results / "benchmark.md").read_text().splitlines()
    assert "--combine-only" in rebuilt[2] and rebuilt[3:] == md.splitlines()[3:]  # all but the command line

    # without the run directories (a fresh clone): the same table from the records kept beside it
    shutil.rmtree(tmp_path / "out" / "tiny_iid")
    fourth = bench(*args[:-3], "--combine-only")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    again = (results / "benchmark.md").read_text()
    assert "records kept in records/tiny_iid.json" in again and f"run directory {tmp_path / 'out' / 'tiny_split'}" in again
    assert again.split("## Online accuracy")[1] == md.split("## Online accuracy")[1]

    # and running the benchmark there resumes from those records: nothing runs again
    fifth = bench(*args)
    assert fifth.returncode == 0, fifth.stderr[-3000:]
    assert "tiny_iid: resuming from the records kept in" in fifth.stderr and fifth.stderr.count("0 to run") == 2
    assert records(tmp_path / "out") == before


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    run = bench("--dry-run", "--out", str(tmp_path / "out"), "--learners", "linear", "transformer", "--workers", "3")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 5 and not (tmp_path / "out").exists()
    for line, name in zip(lines, ("bench_cifar_split", "bench_cifar_iid", "bench_cifar_permuted", "bench_cifar_bursty",
                                  "bench_emnist_split")):
        assert f"-m ocl.cli compare experiment={name} resume=true hydra.run.dir={tmp_path / 'out' / name} " \
               "workers=3 'seeds=[0,1,2]' 'learners=[linear,transformer]'" in line


def test_learners_and_seeds_a_directory_already_ran_are_kept(tmp_path):
    mod = load_script()
    run_dir = tmp_path / "out" / "bench_cifar_iid"
    run_dir.mkdir(parents=True)
    (run_dir / "compare.json").write_text(json.dumps({"records": [
        {"learner": "knn", "seed": 4, "status": "ok"}, {"learner": "mlp", "seed": 0, "status": "failed"}]}))
    args = mod.parse_args(["--out", str(tmp_path / "out"), "--learners", "transformer", "linear", "--seeds", "2"])
    cmd = mod.compare_command(args, "bench_cifar_iid")
    # asking for fewer runs than the directory holds must not make ocl compare refuse (it never drops a
    # finished run): the finished ones are asked for too, in the table order; failed ones are not kept
    assert "seeds=[0,1,4]" in cmd and "learners=[knn,linear,transformer]" in cmd
    assert mod.parse_args(["--max-examples", "50"]).out == Path("runs/benchmark-max50")
    assert mod.parse_args(["--max-examples", "50"]).results == Path("runs/benchmark-max50/results")
    assert mod.parse_args([]).results == mod.RESULTS
