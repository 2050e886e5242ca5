"""Bad inputs: each is one clear error (what, where, how to fix) with a non-zero exit, and
none of them changes an existing result or cache. Mostly through the CLI, in-process."""

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from ocl.cli import main
from ocl.run import run_experiment
from ocl.learners.linear import LinearLearner
from ocl.learners.mlp import MLPLearner

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tree(*dirs):
    """Every file under ``dirs`` with its bytes."""
    return {str(p): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def previous(tmp_path):
    """A run directory (results, .hydra/, log) and a feature cache: bad runs must leave them be,
    byte for byte, and add nothing (no .hydra/ rewrite, no log lines, no lock file)."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    (run / ".hydra").mkdir(parents=True)
    (cache / "entry").mkdir(parents=True)
    files = {run / "results.json": b'{"previous": true}', run / "steps.csv": b"step\n0\n",
             run / ".hydra" / "overrides.yaml": b"- seed=0\n", run / "ocl.log": b"[earlier run]\n",
             cache / "entry" / "features.npy": b"cached"}
    for p, b in files.items():
        p.write_bytes(b)
    before = tree(run, cache)
    yield run, cache
    assert tree(run, cache) == before, "a failed run changed its directory or the cache"


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
    # A run extracts only the images it streams, as per-image shards of the entry (rows/*.npy);
    # a complete entry (features.npy) is checked the same way (tests/streams/test_features.py).
    (feats,) = (tmp_path / "cache").rglob("*.npy")
    feats.write_bytes(feats.read_bytes()[:-100])  # truncated
    with caplog.at_level(logging.WARNING, logger="ocl.streams"):
        b = run_experiment(cfg(), tmp_path / "b")
    assert any("truncated" in r.getMessage() and "extracted again" in r.getMessage() for r in caplog.records)
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
    with caplog.at_level(logging.INFO, logger="ocl.build"):
        res = run_experiment(cfg, tmp_path / "r")
    assert res["n_examples"] == 50 and "accuracy_matrix" not in res
    assert any("has no test split: skipping task-boundary evaluation" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ config and output


@pytest.mark.parametrize("override,expect", [
    ("learner=linearr", "Could not find 'learner/linearr'"),  # hydra's own message lists the options
])
def test_unknown_config_group_option(previous, monkeypatch, capsys, override, expect):
    code, err = ocl(previous, monkeypatch, capsys, override)
    assert code != 0 and expect in err and "Traceback" not in err


@pytest.mark.parametrize("overrides,expect", [
    # hydra used to answer these with exit code 1 and "To append to your config use +learner.lrr=0.1"
    (["learner=linear", "learner.lrr=0.1"], "unknown config key `learner.lrr` (in learner.lrr=0.1); did you mean `learner.lr`?"),
    (["chunk_sise=2"], "unknown config key `chunk_sise` (in chunk_sise=2); did you mean `chunk_size`?"),
    (["notakey=1"], "unknown config key `notakey` (in notakey=1); keys at the top level: stream, protocol,"),
    (["lerner.lr=1"], "unknown config key `lerner` (in lerner.lr=1); did you mean `learner`?"),
    # an option of the learner's class that its config file does not list: then + is the answer
    (["learner=linear", "learner.weight_decay=0.1"],
     "learner.weight_decay: an option of LinearLearner that its config does not list; add it with a leading +: "
     "+learner.weight_decay=0.1"),
    (["learner=linear", "learner.weight_decy=0.1"], "did you mean `learner.weight_decay`? (+learner.weight_decay=0.1)"),
])
def test_mistyped_config_key_names_the_nearest_valid_one(previous, monkeypatch, capsys, overrides, expect):
    err = user_error(previous, monkeypatch, capsys, *overrides)
    assert expect in err and len(err.strip().splitlines()) == 1 and "+learner.lrr" not in err, err


def test_extra_learner_option_with_plus_still_works(tmp_path, monkeypatch):
    """README: `+learner.KEY=V` sets an option the learner's config does not list."""
    _run_ok(tmp_path, monkeypatch, "learner=linear", "+learner.weight_decay=0.01", "protocol.max_examples=30")
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["config"]["learner"]["weight_decay"] == 0.01


@pytest.mark.parametrize("override,expect", [
    ("+learner.temp_lrr=0.1", "learner: unknown option(s) ['temp_lrr'] for PooledLearner; did you mean learner.temp_lr?"),
    ("chunk_size=abc", "chunk_size='abc': must be an integer >= 1"),
    ("checkpoint_every=-5", "checkpoint_every=-5: must be a number of examples >= 1, or null"),
    ("eval_test=maybe", "eval_test='maybe': must be true or false"),
    # used to be tracebacks:
    ("seed=-1", "seed=-1: must be an integer in [0, 18446744073709551615]"),
    ("seed=99999999999999999999", "seed=99999999999999999999: must be an integer in [0,"),
    ("stream=arrays", "stream.path: required but not given; set it on the command line, e.g. stream.path=VALUE"),
    ("protocol.n_tasks=abc", "protocol.n_tasks='abc': must be an integer"),
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
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cannot create the run directory {ro / 'run'}: its parent {ro} does not accept" in err


def test_run_directory_under_proc_says_it_cannot_be_created(monkeypatch, capsys):
    """It used to say "/proc: No such file or directory", as if /proc were missing."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["run", "hydra.run.dir=/proc/ocl-test-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(
        "error: cannot create the run directory /proc/ocl-test-run: its parent /proc does not accept new files")


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


# ------------------------------------------------------------------------ settings that used to run or crash

LR_LEARNERS = ["linear", "mlp", "er", "avalanche_naive", "avalanche_replay", "avalanche_er_ace", "avalanche_gdumb",
               "transformer"]


@pytest.mark.parametrize("learner", LR_LEARNERS)
def test_learning_rate_must_be_a_finite_non_negative_number(previous, monkeypatch, capsys, learner):
    """lr=nan/inf used to run with every update skipped (exit 0); -1 and abc were tracebacks."""
    for value, expect in (("nan", "learner.lr=nan: must be a finite number"),
                          ("inf", "learner.lr=inf: must be a finite number"),
                          ("-1", "learner.lr=-1: must be >= 0"),
                          ("abc", "learner.lr='abc': must be a finite number")):
        assert expect in user_error(previous, monkeypatch, capsys, f"learner={learner}", f"learner.lr={value}")


@pytest.mark.parametrize("override,expect", [
    ("learner.window=abc", "learner.window='abc': must be an integer"),
    ("learner.temp_lr=-0.1", "learner.temp_lr=-0.1: must be >= 0"),
    ("learner.dropout=nan", "learner.dropout=nan: must be a finite number"),
    ("+learner.windw=8", "learner: unknown option(s) ['windw'] for TransformerLearner"),
])
def test_transformer_options_are_checked(previous, monkeypatch, capsys, override, expect):
    assert expect in user_error(previous, monkeypatch, capsys, "learner=transformer", override)


@pytest.mark.parametrize("value", ["-5", "0"])
def test_permuted_max_examples_must_be_positive(previous, monkeypatch, capsys, value):
    """-5 used to run 1,432 examples; 0 was an IndexError."""
    err = user_error(previous, monkeypatch, capsys, "protocol=permuted", f"protocol.max_examples={value}")
    assert f"protocol.max_examples must be positive (a number of examples), or null for the whole stream; got {value}" in err


def test_cache_dir_that_is_a_file(tmp_path, previous, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    err = user_error(previous, monkeypatch, capsys, f"cache_dir={tmp_path / 'afile'}")
    assert f"{tmp_path / 'afile'} is a file, not a directory" in err and "cache_dir=null" in err


# ------------------------------------------------------------------------ data that used to be guessed at

def test_string_labels_in_an_npz(tmp_path, previous, monkeypatch, capsys):
    np.savez(tmp_path / "x.npz", x_train=np.ones((10, 4), np.float32), y_train=np.array(list("ababababab")))
    err = user_error(previous, monkeypatch, capsys, "stream=arrays", f"stream.path={tmp_path / 'x.npz'}", "protocol=iid")
    assert "labels must be integer class indices 0..K-1; got text labels (dtype <U1, e.g. 'a')" in err


def test_a_text_file_named_npz(tmp_path, previous, monkeypatch, capsys):
    (tmp_path / "x.npz").write_text("this is not an archive\n")
    err = user_error(previous, monkeypatch, capsys, "stream=arrays", f"stream.path={tmp_path / 'x.npz'}", "protocol=iid")
    assert f"{tmp_path / 'x.npz'}: not a .npz archive" in err and "pickle" not in err


def _emnist_csv(path, rows=6, first_label="3"):
    rng = np.random.default_rng(0)
    lines = [",".join([str(1 + i % 26)] + [str(v) for v in rng.integers(0, 256, 784)]) for i in range(rows)]
    lines[0] = first_label + lines[0][lines[0].index(","):]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_binary_garbage_as_csv_is_one_short_line(tmp_path, previous, monkeypatch, capsys):
    """The message used to carry 29 KB of the file's bytes."""
    (tmp_path / "g.csv").write_bytes(np.random.default_rng(0).integers(0, 256, 30000, dtype=np.uint8).tobytes())
    err = user_error(previous, monkeypatch, capsys, "stream=emnist", "stream.format=csv",
                     f"stream.train_file={tmp_path / 'g.csv'}", "protocol=iid")
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert f"{tmp_path / 'g.csv'}: not a text file" in line and len(line) < 300


def test_csv_whose_first_label_is_damaged_is_not_a_header(tmp_path, previous, monkeypatch, capsys):
    """The row used to be taken for a header and dropped without a word."""
    csv = _emnist_csv(tmp_path / "c.csv", first_label="x.0")
    err = user_error(previous, monkeypatch, capsys, "stream=emnist", "stream.format=csv", f"stream.train_file={csv}",
                     "protocol=iid")
    assert f"{csv}: row 1: its label is 'x.0', not a number" in err


def test_unreadable_class_folder(tmp_path, previous, monkeypatch, capsys):
    """Simulated (tests may run as root, who reads anything): listing the folder fails with
    EACCES. It used to be skipped, as "no training images" for that class."""
    root = folder(tmp_path / "imgs")
    bad, real = str(root / "b"), os.scandir

    def scandir(p="."):
        if os.path.abspath(os.fspath(p)) == bad:
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real(p)

    monkeypatch.setattr(os, "scandir", scandir)
    err = user_error(previous, monkeypatch, capsys, "stream=imagefolder", f"stream.root={root}", "protocol=iid")
    assert f"permission denied: {bad} while listing the images of a class folder" in err


def test_permission_error_names_the_file(tmp_path, previous, monkeypatch, capsys):
    from ocl.streams import emnist

    csv = _emnist_csv(tmp_path / "c.csv")

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied")  # as os.open reports it: no file name attached

    monkeypatch.setattr(emnist, "open", denied, raising=False)
    err = user_error(previous, monkeypatch, capsys, "stream=emnist", "stream.format=csv", f"stream.train_file={csv}",
                     "protocol=iid")
    assert f"permission denied: {csv} while reading the EMNIST CSV" in err


# ------------------------------------------------------------------------ every example and class is streamed

def _run_ok(tmp_path, monkeypatch, *args):
    """``ocl run ARGS`` in-process, expected to succeed; returns (examples, distinct labels, tasks)."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    main(["run", "progress=false", f"cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'r'}", *args])
    run = tmp_path / "r"
    res = json.loads((run / "results.json").read_text())
    labels = {int(row.split(",")[2]) for row in (run / "steps.csv").read_text().splitlines()[1:]}
    return res["n_examples"], len(labels), res["n_tasks"]


def test_split_with_a_remainder_keeps_every_class(tmp_path, monkeypatch):
    """protocol.n_tasks=3 on digits used to drop a class (146 examples)."""
    assert _run_ok(tmp_path, monkeypatch, "protocol.n_tasks=3") == (1437, 10, 3)


# The real EMNIST sample of README's example: $OCL_SHARED_DATA, or ../shared/data beside the checkout
# (or beside the folder of worktrees).
_REPO = Path(__file__).resolve().parents[1]
EMNIST = next((d / "emnist-letters-sample" for d in (Path(os.environ.get("OCL_SHARED_DATA", "/nonexistent")),
                                                     _REPO.parent / "shared" / "data",
                                                     _REPO.parent.parent / "shared" / "data")
               if (d / "emnist-letters-sample" / "light-train.csv").exists()), _REPO / "missing")


@pytest.mark.skipif(not (EMNIST / "light-train.csv").exists(), reason="needs ../shared/data (the EMNIST sample)")
def test_readme_emnist_example_streams_every_row_and_letter(tmp_path, monkeypatch):
    """README's example (26 classes, 5 tasks) used to stream 954 of 1,000 rows and 25 letters."""
    assert _run_ok(tmp_path, monkeypatch, "stream=emnist", "stream.format=csv",
                   f"stream.train_file={EMNIST / 'light-train.csv'}",
                   f"stream.test_file={EMNIST / 'light-test.csv'}") == (1000, 26, 5)


def test_compare_refuses_a_nan_learning_rate_before_running(tmp_path, monkeypatch, capsys):
    """It used to run linear with every update skipped and rank it ok."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["compare", "progress=false", f"hydra.run.dir={tmp_path / 'cmp'}", f"cache_dir={tmp_path / 'c'}",
              "learners=[linear,ncm]", "+learner_options.linear.lr=nan"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "learner_options.linear.lr=nan: must be a finite number" in err
    assert not (tmp_path / "cmp").exists()


# ------------------------------------------------------------------------ found by a probe of bad inputs

@pytest.mark.parametrize("override,expect", [
    # 0 used to run silently at 224 px (results.json: 0 in the config, 224 in the backbone); -5 was a traceback
    ("backbone.image_size=0", "backbone.image_size=0: must be a positive integer. Set it as backbone.image_size=VALUE"),
    ("backbone.image_size=-5", "backbone.image_size=-5: must be a positive integer."),
    ("backbone.batch_size=0", "backbone.batch_size=0: must be a positive integer."),
])
def test_backbone_image_size_must_be_positive(previous, monkeypatch, capsys, override, expect):
    assert expect in user_error(previous, monkeypatch, capsys, "backbone=efficientnet_lite0", override)


def test_stream_image_size_is_named_by_its_full_key(tmp_path, previous, monkeypatch, capsys):
    root = folder(tmp_path / "imgs")
    err = user_error(previous, monkeypatch, capsys, "stream=imagefolder", f"stream.root={root}", "stream.image_size=0")
    assert "stream.image_size=0: must be a positive integer or null" in err


def test_chunk_larger_than_the_stream(previous, monkeypatch, capsys):
    """It used to run as one chunk: online accuracy 0.0 and no warning."""
    err = user_error(previous, monkeypatch, capsys, "chunk_size=100000")
    assert "chunk_size=100000 is larger than the stream (1,437 examples)" in err


def test_compare_refuses_a_chunk_larger_than_the_stream(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["compare", "progress=false", f"hydra.run.dir={tmp_path / 'cmp'}", f"cache_dir={tmp_path / 'c'}",
              "learners=[linear]", "chunk_size=2000"])
    assert e.value.code == 2 and "chunk_size=2000 is larger than the stream" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_an_error_is_printed_once(tmp_path, previous, monkeypatch, capsys):
    """It used to be printed twice: as a log line and as `error: ...`."""
    err = user_error(previous, monkeypatch, capsys, "stream=arrays", f"stream.path={tmp_path / 'none.npz'}")
    assert err.count("data not found") == 1 and "[ERROR]" not in err


def test_help_names_the_configured_default_learner(capsys):
    from ocl.cli import default_groups

    main(["--help"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("ocl run  "))
    defaults = default_groups()
    assert defaults["learner"] == "pooled" and line.rstrip().endswith(", ".join(defaults.values()))


@pytest.mark.parametrize("command", ["run", "compare"])
def test_sigterm_before_learning_is_a_clean_stop(tmp_path, monkeypatch, capsys, command):
    """SIGTERM (kill, a scheduler) used to kill the process where it stood (default action);
    now it ends like Ctrl-C: one message, exit code 130, no traceback, the lock released."""
    import signal

    from ocl import build

    def load(cfg):  # while loading data, before the run loop (whose checkpointer handles signals itself)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(build, "load_source", load)
    monkeypatch.setattr("ocl.compare.load_source", load)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        main([command, "progress=false", f"hydra.run.dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'c'}",
              *(["learners=[linear]"] if command == "compare" else [])])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == before  # put back
    assert not (tmp_path / "r").exists()  # made for this run, nothing kept: removed with its lock file


def test_image_folder_with_symbolic_link_cycles(tmp_path, previous, monkeypatch, capsys):
    """`cyc -> .` plus `x/up -> ..` used to hang with no output."""
    root = folder(tmp_path / "imgs")
    os.symlink(".", root / "cyc")
    os.symlink("..", root / "a" / "up")
    err = user_error(previous, monkeypatch, capsys, "stream=imagefolder", f"stream.root={root}", "protocol=iid")
    assert f"{root / 'a' / 'up'}: a symbolic link cycle" in err or f"{root / 'cyc'}: a symbolic link cycle" in err


def test_image_whose_header_claims_20000x20000(tmp_path, previous, monkeypatch, capsys):
    """It ended in PIL's DecompressionBombError traceback."""
    root = folder(tmp_path / "imgs")
    big = root / "b" / "0.png"
    Image.new("1", (20000, 20000)).save(big)  # 1 bit per pixel: a small file with a huge header
    err = user_error(previous, monkeypatch, capsys, "stream=imagefolder", f"stream.root={root}", "protocol=iid")
    assert f"{big}: too large to decode: Image size (400000000 pixels) exceeds limit" in err


def test_missing_image_folder_is_named_by_its_option(tmp_path, previous, monkeypatch, capsys):
    """It used to be named after the folder's last path part: "data: data not found"."""
    err = user_error(previous, monkeypatch, capsys, "stream=imagefolder", f"stream.root={tmp_path / 'data'}")
    assert err.startswith(f"error: image folder (stream.root={tmp_path / 'data'}): data not found.")


@pytest.mark.parametrize("top", [1_000_000, 10**9])
def test_sparse_label_ids_are_renumbered(tmp_path, monkeypatch, top):
    """Labels 0 and 1,000,000 used to make a 1,000,001-class run (a 68 MB checkpoint, 14.5 ex/s);
    0 and 10**9 a MemoryError. They are renumbered to classes 0..K-1 in label order, named by
    their ids, and results.json records the map."""
    rng = np.random.default_rng(0)
    y = np.where(np.arange(40) < 20, 0, top)
    x = (rng.normal(size=(40, 4)) + (y[:, None] > 0) * 3).astype(np.float32)
    np.savez(tmp_path / "x.npz", x_train=x, y_train=y, x_test=x[:4], y_test=np.array([0, top, top, 0]))
    _run_ok(tmp_path, monkeypatch, "stream=arrays", f"stream.path={tmp_path / 'x.npz'}", "protocol=split",
            "protocol.n_tasks=2", "learner=linear")
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["num_classes"] == 2 and res["label_map"] == [0, top] and res["n_tasks"] == 2
    ckpt = (tmp_path / "r" / "checkpoint.pt").stat().st_size
    assert ckpt < 1_000_000  # a 2-class learner, not a 1,000,001-class one
    labels = [int(r.split(",")[2]) for r in (tmp_path / "r" / "steps.csv").read_text().splitlines()[1:]]
    assert labels == [0] * 20 + [1] * 20  # class-incremental: task 0 is label 0, task 1 label `top`
