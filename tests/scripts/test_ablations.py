"""scripts/ablations.py: the transformer's ablations, one `ocl run` per variant and seed, one table."""

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ablations(load_script):
    return load_script("ablations.py")


def fake_run(path: Path, acc: float, correct: np.ndarray, task: np.ndarray) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"avg_online_accuracy": acc, "near_future_accuracy": None,
                                                   "mean_log_loss": 1.0, "examples_per_second": 50.0}))
    rows = ["step,task,label,pred,correct,loss,p_true"]
    rows += [f"{i},{t},0,0,{c},1.0,0.5" for i, (t, c) in enumerate(zip(task, correct))]
    (path / "steps.csv").write_text("\n".join(rows) + "\n")


def test_every_variant_is_one_ocl_run_with_its_overrides(ablations, tmp_path):
    args, extra = ablations.parse_args(["--streams", "s", "--out", str(tmp_path), "--", "threads=1"])
    cmd = ablations.command(args, "s", "network W=0", 2, extra)
    assert cmd[3:6] == ["run", "experiment=s", "learner=transformer"]
    assert "seed=2" in cmd and "eval_test=false" in cmd and cmd[-1] == "threads=1"
    assert "learner.window=0" in cmd
    assert f"hydra.run.dir={tmp_path}/s/network_W0_s2" in cmd
    pooled = ablations.command(args, "s", "W=0", 0, [])  # the default pool, its network without a cache
    assert pooled[5] == "learner=pooled" and "learner.experts=[{name:transformer,window:0},linear,slda]" in pooled
    assert ablations.command(args, "s", "default", 0, [])[-1].startswith("hydra.run.dir=")  # no overrides


def test_the_table_gives_mean_and_sample_std_over_seeds_and_recovery_after_switches(ablations, tmp_path):
    args, _ = ablations.parse_args(["--streams", "s", "--variants", "default", "R=1", "--seeds", "2",
                                    "--out", str(tmp_path), "--combine-only"])
    task = np.repeat([0, 1], 200)
    late = np.r_[np.ones(200), np.zeros(100), np.ones(100)]  # wrong for the first 100 after the switch
    fake_run(tmp_path / "s" / "default_s0", 0.5, np.ones(400), task)
    fake_run(tmp_path / "s" / "default_s1", 0.7, late, task)
    rows = ablations.combine(args)
    default, r1 = rows
    assert default["seeds"] == 2 and r1["seeds"] == 0 and r1["avg_online_accuracy"] is None
    assert default["avg_online_accuracy"] == pytest.approx([0.6, np.std([0.5, 0.7], ddof=1)])
    assert default["first100"] == pytest.approx([0.5, np.std([1.0, 0.0], ddof=1)])
    table = ablations.markdown(rows)
    assert "| s | default | 2 | 0.6000 ± 0.1414 | - | 1.0000 ± 0.0000 | 0.5000 ± 0.7071 | 50 ± 0 |" in table
    assert "| s | R=1 | 0 | - | - | - | - | - |" in table


def test_research_variants_and_seeds_from_the_command_line(ablations, tmp_path):
    args, _ = ablations.parse_args(["--streams", "s", "--out", str(tmp_path), "--first-seed", "100", "--seeds", "2",
                                    "--variants", "network segment=8 lr=0.003", "default copy=false", "linear"])
    assert list(ablations.seeds(args)) == [100, 101]
    cmd = ablations.command(args, "s", "network segment=8 lr=0.003", 100, [])
    assert "learner=transformer" in cmd and "learner.segment=8" in cmd and "learner.lr=0.003" in cmd
    assert f"hydra.run.dir={tmp_path}/s/network_segment8_lr0.003_s100" in cmd
    pooled = ablations.command(args, "s", "default copy=false", 101, [])
    assert "learner.experts=[{name:transformer,copy:false},linear,slda]" in pooled and "seed=101" in pooled
    assert "learner=linear" in ablations.command(args, "s", "linear", 100, [])
    for bad in ("netwrk segment=8", "network segment", "linear lr=0.1"):
        with pytest.raises(SystemExit, match="variant"):
            ablations.learner_of(bad)


def test_paired_rows_are_differences_over_the_seeds_both_variants_finished(ablations, tmp_path):
    args, _ = ablations.parse_args(["--streams", "s", "--variants", "default", "R=1", "--seeds", "3",
                                    "--out", str(tmp_path), "--combine-only", "--paired", "R=1"])
    task = np.zeros(300, dtype=int)
    for seed, acc in ((0, 0.6), (1, 0.8), (2, 0.9)):
        fake_run(tmp_path / "s" / f"default_s{seed}", acc, np.ones(300), task)
    for seed, acc in ((0, 0.5), (1, 0.5)):  # seed 2 of R=1 did not finish: out of the pairs
        fake_run(tmp_path / "s" / f"R1_s{seed}", acc, np.ones(300), task)
    rows = ablations.combine(args)
    paired = [r for r in rows if r.get("paired")]
    assert [r["variant"] for r in paired] == ["default - R=1"] and paired[0]["seeds"] == 2
    assert paired[0]["avg_online_accuracy"] == pytest.approx([0.2, np.std([0.1, 0.3], ddof=1)])
    assert paired[0]["mean_log_loss"] == pytest.approx([0.0, 0.0])
    assert paired[0]["examples_per_second"] == pytest.approx([1.0, 0.0])  # a ratio, not a difference
    assert "| s | default - R=1 | 2 | +0.2000 ± 0.1414 | - | +0.0000 ± 0.0000 | - | 1.00x ± 0.00 |" in ablations.markdown(rows)
    with pytest.raises(SystemExit, match="--paired"):
        ablations.main(["--streams", "s", "--variants", "default", "--out", str(tmp_path), "--combine-only",
                        "--paired", "R=1"])
