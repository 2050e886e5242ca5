"""End-to-end runs through the config layer (in-process, via hydra's compose API)."""

import json
import textwrap

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from ocl.errors import OCLError
from ocl.run import run_experiment


def config(tmp_path, *overrides):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name="config",
                       overrides=["progress=false", f"cache_dir={tmp_path / 'cache'}", *overrides])


def test_default_run_on_digits(tmp_path):
    res = run_experiment(config(tmp_path), tmp_path / "run")
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    for k in ("avg_online_accuracy", "cumulative_log_loss", "n_examples", "examples_per_second"):
        assert k in out
    assert out["n_examples"] == res["n_examples"] == 1437  # 80% of 1,797 digits
    assert out["n_tasks"] == 5 and np.asarray(out["accuracy_matrix"]).shape == (5, 5)
    # a linear model learns digits well above chance (0.1) even class-incrementally
    assert 0.5 < out["avg_online_accuracy"] < 1.0
    assert out["cumulative_log_loss"] == pytest.approx(out["mean_log_loss"] * 1437)
    rows = (tmp_path / "run" / "steps.csv").read_text().splitlines()
    assert rows[0] == "step,task,label,pred,correct,loss,p_true" and len(rows) == 1438
    assert out["random_backbone"] is False
    # near-future accuracy with the defaults S = 100, m = 20: after steps 19, 39, ..., 1319 (the
    # target t + 1 + 100 must exist), 66 evaluations, one row each in near_future.csv
    assert (out["near_future_offset"], out["near_future_every"], out["near_future_evaluations"]) == (100, 20, 66)
    assert 0.0 < out["near_future_accuracy"] < out["avg_online_accuracy"]
    nf = (tmp_path / "run" / "near_future.csv").read_text().splitlines()
    assert nf[0] == "step,target,label,pred,correct,loss,p_true" and len(nf) == 67
    assert nf[1].startswith("19,120,") and nf[-1].startswith("1319,1420,")
    assert np.mean([int(r.split(",")[4]) for r in nf[1:]]) == pytest.approx(out["near_future_accuracy"])


def test_near_future_settings_off_and_bad_values(tmp_path):
    res = run_experiment(config(tmp_path, "protocol.max_examples=200", "near_future.every=null"), tmp_path / "off")
    assert res["near_future_accuracy"] is None and res["near_future_every"] is None
    assert not (tmp_path / "off" / "near_future.csv").exists()
    res = run_experiment(config(tmp_path, "protocol=bursty", "protocol.max_examples=200", "near_future.offset=0",
                                "near_future.every=1", "chunk_size=4"), tmp_path / "dense")
    assert res["protocol"] == "bursty" and res["near_future_evaluations"] == 49  # after every chunk but the last
    for bad, msg in [("near_future.offset=-1", "offset"), ("near_future.offset=1.5", "offset"),
                     ("near_future.every=0", "every"), ("near_future.every=true", "every"),
                     ("near_future=3", "near_future")]:
        with pytest.raises(OCLError, match=msg):
            run_experiment(config(tmp_path, "protocol.max_examples=50", bad), tmp_path / "bad")
    assert not (tmp_path / "bad" / "results.json").exists()


def test_same_seed_same_result_and_seed_changes_order(tmp_path):
    a = run_experiment(config(tmp_path, "protocol=iid", "chunk_size=4"), tmp_path / "a")
    b = run_experiment(config(tmp_path, "protocol=iid", "chunk_size=4"), tmp_path / "b")
    c = run_experiment(config(tmp_path, "protocol=iid", "chunk_size=4", "seed=1"), tmp_path / "c")
    assert a["cumulative_log_loss"] == b["cumulative_log_loss"]
    assert a["cumulative_log_loss"] != c["cumulative_log_loss"]


def test_permuted_protocol_runs(tmp_path):
    res = run_experiment(config(tmp_path, "protocol=permuted", "protocol.segment_length=300"), tmp_path / "r")
    assert res["n_tasks"] == 5 and res["protocol"] == "permuted"


def test_custom_stream_by_target(tmp_path, monkeypatch):
    (tmp_path / "mystream.py").write_text(textwrap.dedent("""
        import numpy as np
        def make(n=60):
            rng = np.random.default_rng(0)
            y = rng.integers(0, 3, n)
            x = (rng.random((n, 6)) + y[:, None]).astype(np.float32)
            return [(xi, int(yi)) for xi, yi in zip(x, y)]   # any iterable of (x, y)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    res = run_experiment(
        config(tmp_path, "stream=custom", "stream._target_=mystream.make", "+stream.n=90", "protocol=iid"),
        tmp_path / "r")
    assert res["n_examples"] == 90 and res["num_classes"] == 3 and res["feature_dim"] == 6


def test_nan_features_are_refused(tmp_path):
    x = np.ones((10, 4), dtype=np.float32)
    x[3, 1] = np.nan
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=np.arange(10) % 2)
    with pytest.raises(OCLError, match="NaN"):
        run_experiment(config(tmp_path, "stream=arrays", f"stream.path={tmp_path / 'bad.npz'}", "protocol=iid"),
                       tmp_path / "r")


def test_missing_dataset_names_expected_paths(tmp_path):
    with pytest.raises(OCLError) as e:
        run_experiment(config(tmp_path, "stream=cifar10", f"stream.root={tmp_path / 'nope'}", "stream.download=false"),
                       tmp_path / "r")
    assert str(tmp_path / "nope") in str(e.value)


def test_threads_setting_applies_to_learning_and_is_restored(tmp_path):
    import torch

    before = torch.get_num_threads()
    res = run_experiment(config(tmp_path, "threads=1", "protocol.max_examples=50"), tmp_path / "r")
    assert res["threads"] == 1 and torch.get_num_threads() == before
    with pytest.raises(OCLError, match="threads"):
        run_experiment(config(tmp_path, "threads=0", "protocol.max_examples=50"), tmp_path / "r2")


def test_transformer_learner_runs_in_both_label_modes(tmp_path):
    tiny = ["learner=transformer", "learner.d_model=16", "learner.window=4", "learner.replay_streams=2",
            "protocol.max_examples=60"]
    for mode in ("kv", "context"):
        res = run_experiment(config(tmp_path, *tiny, f"learner.label_mode={mode}"), tmp_path / mode)
        assert res["learner"] == "transformer" and res["n_examples"] == 60
        assert res["config"]["learner"]["label_mode"] == mode
