"""``ocl compare``: learners x seeds on one tiny stream (digits, 2 tasks x 40 examples)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_module

import ocl.build as build
from ocl.build import ALL_LEARNERS, available_learners
from ocl.compare import ranked_table, resolve_learners, resolve_seeds, run_compare
from ocl.errors import OCLError
from ocl.run import run_experiment

TINY = ["protocol.n_tasks=2", "protocol.examples_per_task=40"]  # 80 examples, 2 tasks, ~0.1 s per run


def config(tmp_path, *overrides, name="compare"):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name=name, overrides=["progress=false", f"cache_dir={tmp_path / 'cache'}",
                                                    *TINY, *overrides])


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def extract_calls(monkeypatch):
    """Count calls of the feature extractor entry point (ocl.build's, which ocl.compare goes through)."""
    calls = []
    real = build.extract_features

    def spy(images, *args, **kwargs):
        calls.append(len(images))
        return real(images, *args, **kwargs)

    monkeypatch.setattr(build, "extract_features", spy)
    return calls


def test_compare_records_table_plots_and_features_once(tmp_path, extract_calls, capsys):
    out = tmp_path / "run"
    payload = run_compare(config(tmp_path, "learners=[recent,linear,ncm]", "seeds=2", "near_future.offset=5",
                                 "near_future.every=10"), out)

    # features: one extraction per split (train, test) for 3 learners x 2 seeds
    assert extract_calls == [1437, 360]

    data = json.loads((out / "compare.json").read_text())
    recs = data["records"]
    assert data["complete"] is True and len(recs) == 6
    assert sorted((r["learner"], r["seed"]) for r in recs) == sorted(
        (n, s) for n in ("recent", "linear", "ncm") for s in (0, 1))
    for r in recs:
        assert r["status"] == "ok" and r["error"] is None and r["n_examples"] == 80
        for m in ("avg_online_accuracy", "cumulative_log_loss", "mean_log_loss", "final_avg_accuracy",
                  "forgetting", "backward_transfer", "avg_anytime_accuracy", "examples_per_second",
                  "near_future_accuracy", "near_future_mean_log_loss"):
            assert isinstance(r[m], float), (r["learner"], m)
        # after steps 9, 19, ..., 69 on targets 15, 25, ..., 75 (the one after step 79 is past the end)
        assert (r["near_future_offset"], r["near_future_every"], r["near_future_evaluations"]) == (5, 10, 7)
        assert r["cumulative_log_loss"] == pytest.approx(80 * r["mean_log_loss"])
        assert np.asarray(r["accuracy_matrix"]).shape == (2, 2)
    # the protocol is rebuilt per seed: the two seeds see different streams
    lin = {r["seed"]: r for r in recs if r["learner"] == "linear"}
    assert lin[0]["online_accuracy_curve"]["accuracy"] != lin[1]["online_accuracy_curve"]["accuracy"]

    # ranked best first by online accuracy; the blind baseline is last
    summary = data["summary"]
    means = [row["mean"]["avg_online_accuracy"] for row in summary]
    assert means == sorted(means, reverse=True) and summary[-1]["learner"] == "recent"
    assert [row["rank"] for row in summary] == [1, 2, 3]
    mean_lin = np.mean([lin[s]["avg_online_accuracy"] for s in (0, 1)])
    assert next(r for r in summary if r["learner"] == "linear")["mean"]["avg_online_accuracy"] == pytest.approx(mean_lin)

    table = ranked_table(payload)
    body = table.splitlines()
    assert "online acc" in body[1] and "mean log-loss" in body[1] and "ex/s" in body[1]
    assert body[1].index("online acc") < body[1].index("near-future acc") < body[1].index("mean log-loss")
    assert "near-future acc: the learner after step t scores the unseen x_(t+1+S), S=5, every 10 steps " \
           "(7 evaluations per run)" in table
    nf_col = [row["mean"]["near_future_accuracy"] for row in summary]
    assert all(f"{v:.4f}" in line for v, line in zip(nf_col, body[3:6]))
    order = [next(n for n in ("recent", "linear", "ncm") if f" {n} " in line) for line in body[3:6]]
    assert order == [row["learner"] for row in summary]
    assert "±" in table

    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {"learner", "seed", "avg_online_accuracy", "forgetting"} <= set(rows[0])
    by = {(r["learner"], int(r["seed"])): r for r in rows}
    for r in recs:
        row = by[(r["learner"], r["seed"])]
        assert float(row["near_future_accuracy"]) == pytest.approx(r["near_future_accuracy"])
        assert (row["near_future_offset"], row["near_future_every"], row["near_future_evaluations"]) == ("5", "10", "7")

    for png in ("curves.png", "acc_matrix.png"):
        assert is_png(out / png) and (out / png).stat().st_size > 5000
    assert not [p for p in os.listdir(out) if p.startswith(".work-")]  # scratch dirs removed


def test_compare_matches_ocl_run_for_the_same_seed(tmp_path):
    """A compare record is the run `ocl run learner=NAME seed=S` would make on the same stream."""
    payload = run_compare(config(tmp_path, "learners=[linear]", "seeds=[3]", "plots=false"), tmp_path / "c")
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose(config_name="config", overrides=["progress=false", f"cache_dir={tmp_path / 'cache'}", *TINY,
                                                       "learner=linear", "seed=3"])
    res = run_experiment(cfg, tmp_path / "r")
    rec = payload["records"][0]
    assert rec["seed"] == 3
    for m in ("avg_online_accuracy", "cumulative_log_loss", "final_avg_accuracy", "forgetting"):
        assert rec[m] == pytest.approx(res[m], abs=1e-12), m
    assert not (tmp_path / "c" / "curves.png").exists()


def test_near_future_off_and_undefined_in_the_table(tmp_path):
    # off: the column is empty and the note says so; on, with S past the 80-step stream: no evaluation
    for over, note in [("near_future.every=null", "near-future acc: off"), ("near_future.offset=100", "(0 evaluations")]:
        payload = run_compare(config(tmp_path, "learners=[ncm]", over, "plots=false"), tmp_path / over)
        rec = payload["records"][0]
        assert rec["status"] == "ok" and rec["near_future_accuracy"] is None
        table = ranked_table(payload)
        assert note in table and table.splitlines()[3].split()[3] == "-"  # #, learner, online acc, near-future acc


def test_failing_learner_is_recorded_and_others_kept(tmp_path):
    # an optimizer the MLP does not know makes every mlp run fail with an OCLError (a string
    # option: only the learner can tell); ncm must still run
    payload = run_compare(config(tmp_path, "learners=[mlp,ncm]", "+learner_options.mlp.optimizer=adamw"),
                          tmp_path / "r")
    by = {r["learner"]: r for r in payload["records"]}
    assert by["mlp"]["status"] == "failed" and "adamw" in by["mlp"]["error"]
    assert by["mlp"]["avg_online_accuracy"] is None
    assert by["ncm"]["status"] == "ok" and by["ncm"]["avg_online_accuracy"] > 0.3
    assert [row["learner"] for row in payload["summary"]] == ["ncm", "mlp"]  # failed last
    table = ranked_table(payload)
    assert "FAILED" in table and "mlp failed:" in table
    saved = json.loads((tmp_path / "r" / "compare.json").read_text())
    assert saved["records"][0]["status"] == "failed"


def test_learner_options_reach_the_learner(tmp_path):
    payload = run_compare(config(tmp_path, "learners=[recent]", "+learner_options.recent.window=7", "plots=false"),
                          tmp_path / "r")
    assert payload["records"][0]["learner_config"]["window"] == 7


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(OCLError, match="valid learners: .*linear"):
        run_compare(config(tmp_path, "learners=[linear,lstm]"), tmp_path / "r")
    with pytest.raises(OCLError, match="seeds"):
        run_compare(config(tmp_path, "learners=[linear]", "seeds=0"), tmp_path / "r")
    with pytest.raises(OCLError, match="rank_by"):
        run_compare(config(tmp_path, "learners=[linear]", "rank_by=speed"), tmp_path / "r")
    with pytest.raises(OCLError, match="learner_options"):
        run_compare(config(tmp_path, "learners=[linear]", "+learner_options.knn.k=3"), tmp_path / "r")
    assert resolve_seeds(3, 10) == [10, 11, 12] and resolve_seeds([5, 1], 0) == [5, 1]
    with pytest.raises(OCLError, match="the last seed would pass 18446744073709551615"):
        resolve_seeds(2, 2**64 - 1)
    with pytest.raises(OCLError, match="every seed must be in"):
        resolve_seeds([-1, 3], 0)


def test_default_learner_list_is_every_shipped_config_baselines_first_transformer_and_pools_last():
    """ALL_LEARNERS is read from configs/learner/ (a new config joins ``learners=null``), in table
    order: the baselines, the Avalanche strategies, then the transformer (the network alone), the
    read-outs pooled without it and the default pool (network + read-outs)."""
    assert sorted(ALL_LEARNERS) == available_learners() and len(ALL_LEARNERS) >= 14
    assert ALL_LEARNERS[-3:] == ("transformer", "readout_pool", "pooled")
    avalanche = [i for i, n in enumerate(ALL_LEARNERS) if n.startswith("avalanche_")]
    assert avalanche == list(range(len(ALL_LEARNERS) - 3 - len(avalanche), len(ALL_LEARNERS) - 3))
    assert resolve_learners(None) == list(ALL_LEARNERS)


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    run_compare(config(tmp_path, "learners=[recent]", "tensorboard=true", "plots=false"), tmp_path / "r")
    events = list((tmp_path / "r" / "tensorboard" / "recent" / "seed0").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(OCLError, match="pip install tensorboard"):
        run_compare(config(tmp_path, "learners=[recent]", "tensorboard=true"), tmp_path / "r")


def test_cli_unknown_learner_exits_2_with_valid_names(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ocl.cli", "compare", "learners=[linear,nope]",
                        f"hydra.run.dir={tmp_path / 'r'}", "progress=false"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 2, p.stderr
    assert "nope" in p.stderr and "valid learners:" in p.stderr and "avalanche_er_ace" in p.stderr
    assert "Traceback" not in p.stderr
