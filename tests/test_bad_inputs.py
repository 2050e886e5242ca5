"""Bad inputs: each is one clear error (what, where, how to fix) with a non-zero exit, and
none of them changes an existing result or cache. Mostly through the CLI, in-process."""

import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from ocl.cli import main
from ocl.experiment import run_experiment
from ocl.learners.linear import LinearLearner
from ocl.learners.mlp import MLPLearner

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def previous(tmp_path):
    """A run directory and a feature cache that already hold results: bad runs must leave them be."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    run.mkdir()
    (cache / "entry").mkdir(parents=True)
    files = {run / "results.json": b'{"previous": true}', run / "steps.csv": b"step\n0\n",
             cache / "entry" / "features.npy": b"cached"}
    for p, b in files.items():
        p.write_bytes(b)
    yield run, cache
    for p, b in files.items():
        assert p.read_bytes() == b, f"{p} was changed by a failed run"


def ocl(previous, monkeypatch, capsys, *args):
    """``ocl run ARGS`` in-process; returns (exit code, stderr)."""
    run, cache = previous
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["run", "progress=false", f"cache_dir={cache}", f"hydra.run.dir={run}", *args])
    return e.value.code, capsys.readouterr().err


def user_error(previous, monkeypatch, capsys, *args) -> str:
    code, err = ocl(previous, monkeypatch, capsys, *args)
    assert code == 2 and "error: " in err and "Traceback" not in err, err
    return err


def png(path, shape=(8, 8, 3), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8).squeeze()).save(path)


def folder(root, n=3):
    for c in "ab":
        for i in range(n):
            png(root / c / f"{i}.png", seed=i)
    return root


# ------------------------------------------------------------------------ images


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_corrupt_image_file(tmp_path, previous, monkeypatch, capsys, damage):
    root = folder(tmp_path / "imgs")
    bad = root / "a" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40] if damage == "truncated" else b"")
    err = user_error(previous, monkeypatch, capsys, "stream=imagefolder", f"stream.root={root}", "protocol=iid")
    assert str(bad) in err and "corrupt or truncated" in err


def test_corrupt_image_in_cifar10_image_folder(tmp_path, previous, monkeypatch, capsys):
    root = tmp_path / "cifar"
    for split in ("train", "test"):
        for c in CIFAR10:
            png(root / split / c / "0.png", (32, 32, 3))
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(bad.read_bytes()[:100])
    err = user_error(previous, monkeypatch, capsys, "stream=cifar10", f"stream.root={root}", "stream.download=false",
                     "protocol=iid")
    assert str(bad) in err and "corrupt or truncated" in err


def test_wrong_image_size(tmp_path, previous, monkeypatch, capsys):
    root = folder(tmp_path / "imgs")
    png(root / "b" / "1.png", (9, 8, 3))
    err = user_error(previous, monkeypatch, capsys, "stream=imagefolder", f"stream.root={root}", "protocol=iid")
    assert "b/1.png: image is 8x9" in err and "Set image_size" in err


@pytest.mark.parametrize("shape,expect", [((6, 4, 4, 4), "1 or 3 channels"), ((6, 4, 4, 3, 1), "expected images")])
def test_wrong_channels_or_rank(tmp_path, previous, monkeypatch, capsys, shape, expect):
    np.savez(tmp_path / "x.npz", x_train=np.zeros(shape, np.uint8), y_train=np.arange(6) % 2)
    err = user_error(previous, monkeypatch, capsys, "stream=arrays", f"stream.path={tmp_path / 'x.npz'}", "protocol=iid")
    assert expect in err and str(tmp_path / "x.npz") in err


def test_train_and_test_images_of_different_sizes(tmp_path, previous, monkeypatch, capsys):
    np.savez(tmp_path / "x.npz", x_train=np.zeros((6, 4, 4, 3), np.uint8), y_train=np.arange(6) % 2,
             x_test=np.zeros((2, 5, 5, 3), np.uint8), y_test=np.arange(2))
    err = user_error(previous, monkeypatch, capsys, "stream=arrays", f"stream.path={tmp_path / 'x.npz'}", "protocol=iid")
    assert "train items have shape (4, 4, 3) but test items (5, 5, 3)" in err


# ------------------------------------------------------------------------ features and labels


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_features(tmp_path, previous, monkeypatch, capsys, value):
    x = np.ones((10, 4), np.float32)
    x[3, 1] = value
    np.savez(tmp_path / "x.npz", x_train=x, y_train=np.arange(10) % 2)
    err = user_error(previous, monkeypatch, capsys, "stream=arrays", f"stream.path={tmp_path / 'x.npz'}", "protocol=iid")
    assert "feature vector 3 contains NaN or inf" in err


def test_corrupt_feature_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys, caplog):
    """Not an error: the cache is only a copy, so a bad entry is rebuilt (with a WARNING that
    says why) and the run's results are those of a clean cache."""
    tiny = ["backbone=dino_vits16", "backbone.weights=random", "backbone.image_size=16", "backbone.device=cpu",
            "+backbone.model_kwargs={embed_dim:24,depth:1,num_heads:2}", "stream.test_fraction=0",
            "protocol.max_examples=40", "protocol.n_tasks=2", f"cache_dir={tmp_path / 'cache'}", "progress=false"]

    def cfg():
        with initialize_config_module(config_module="ocl.configs", version_base=None):
            return compose(config_name="config", overrides=tiny)

    a = run_experiment(cfg(), tmp_path / "a")
    (feats,) = (tmp_path / "cache").rglob("features.npy")
    feats.write_bytes(feats.read_bytes()[:-100])  # truncated
    with caplog.at_level(logging.WARNING, logger="ocl.streams.features"):
        b = run_experiment(cfg(), tmp_path / "b")
    assert any("truncated" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert a["cumulative_log_loss"] == b["cumulative_log_loss"]


@pytest.mark.parametrize("labels,classes,expect", [
    (np.arange(10) % 3, ["+stream.classes=[a,b]"], "label 2 at index 2 is outside the declared 2 classes [0, 1]"),
    (np.arange(10) % 3 - 1, [], "label -1 at index 0 is outside"),
])
def test_labels_outside_declared_classes(tmp_path, previous, monkeypatch, capsys, labels, classes, expect):
    np.savez(tmp_path / "x.npz", x_train=np.ones((10, 4), np.float32), y_train=labels)
    err = user_error(previous, monkeypatch, capsys, "stream=arrays", f"stream.path={tmp_path / 'x.npz'}",
                     "protocol=iid", *classes)
    assert expect in err


def test_empty_stream(tmp_path, previous, monkeypatch, capsys):
    np.savez(tmp_path / "x.npz", x_train=np.ones((0, 4), np.float32), y_train=np.zeros(0, np.int64))
    err = user_error(previous, monkeypatch, capsys, "stream=arrays", f"stream.path={tmp_path / 'x.npz'}", "protocol=iid")
    assert "training split is empty" in err
    err = user_error(previous, monkeypatch, capsys, "protocol.max_examples=0")
    assert "max_examples must be positive" in err


def test_missing_test_split_runs_without_evaluation(tmp_path, caplog):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose(config_name="config", overrides=["stream.test_fraction=0", "protocol.max_examples=50",
                                                       "progress=false", f"cache_dir={tmp_path / 'c'}"])
    with caplog.at_level(logging.INFO, logger="ocl.experiment"):
        res = run_experiment(cfg, tmp_path / "r")
    assert res["n_examples"] == 50 and "accuracy_matrix" not in res
    assert any("has no test split: skipping task-boundary evaluation" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ config and output


@pytest.mark.parametrize("override,expect", [
    ("learner.lrr=0.1", "Key 'lrr' is not in struct"),  # hydra: mistyped key
    ("chunk_sise=2", "Key 'chunk_sise' is not in struct"),
    ("learner=linearr", "Could not find 'learner/linearr'"),
])
def test_unknown_or_mistyped_config_keys(previous, monkeypatch, capsys, override, expect):
    code, err = ocl(previous, monkeypatch, capsys, override)
    assert code != 0 and expect in err and "Traceback" not in err


@pytest.mark.parametrize("override,expect", [
    ("+learner.lrr=0.1", "learner: unknown option(s) ['lrr'] for LinearLearner; valid options: ['lr', 'standardize'"),
    ("chunk_size=abc", "chunk_size='abc': must be an integer >= 1"),
    ("checkpoint_every=-5", "checkpoint_every=-5: must be a number of examples >= 1, or null"),
    ("eval_test=maybe", "eval_test='maybe': must be true or false"),
])
def test_bad_config_values(previous, monkeypatch, capsys, override, expect):
    assert expect in user_error(previous, monkeypatch, capsys, override)


def test_output_directory_that_cannot_be_created(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["run", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "afile is a file, not a directory" in err and "hydra.run.dir=DIR" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_non_writable_output_directory(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["run", f"hydra.run.dir={ro / 'run'}"])
    assert e.value.code == 2 and "cannot write to the run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------ non-finite training loss


@pytest.mark.parametrize("make", [lambda: LinearLearner(4, 3), lambda: MLPLearner(4, 3, hidden=8)],
                         ids=["linear", "mlp"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_loss_skips_update_and_keeps_parameters(make, bad, caplog):
    torch.manual_seed(0)
    learner = make()
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    learner.update(x, y)
    params = [p.detach().clone() for p in learner.opt.param_groups[0]["params"]]
    norm = learner.norm.mean.clone()
    with caplog.at_level(logging.WARNING):
        learner.update(torch.tensor([[bad, 0.0, 0.0, 0.0]]), torch.tensor([2]))
    assert learner.skipped_updates == 1 and "skipped an update" in caplog.text
    for p, before in zip(learner.opt.param_groups[0]["params"], params):
        assert torch.equal(p.detach(), before)  # not poisoned
    assert torch.equal(learner.norm.mean, norm)  # the input statistics neither
    learner.update(x, y)  # and learning goes on
    assert learner.skipped_updates == 1 and torch.isfinite(learner.predict(x)).all()


def test_skipped_updates_are_reported(tmp_path):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose(config_name="config", overrides=["protocol.max_examples=20", "progress=false",
                                                       f"cache_dir={tmp_path / 'c'}"])
    run_experiment(cfg, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "results.json").read_text())["skipped_updates"] == 0
