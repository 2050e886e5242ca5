"""ocl.build: the learner configs state what differs from the Python defaults; a run records every option."""

import inspect
from importlib import resources

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ocl.build import available_learners, learner_config, make_learner
from ocl.learners.linear import LinearLearner
from ocl.options import LEARNER_ARGS, option_defaults
from ocl.run import run_experiment


@pytest.mark.parametrize("name", available_learners())
def test_a_learner_config_holds_every_option_yaml_over_python_defaults(name):
    node = learner_config(name)
    yaml = OmegaConf.create(resources.files("ocl.configs").joinpath("learner", f"{name}.yaml").read_text())
    defaults = option_defaults(node, LEARNER_ARGS)
    assert defaults and set(defaults) <= set(node) and not set(LEARNER_ARGS) & set(node)
    for key in node:
        assert node[key] == (yaml[key] if key in yaml else defaults[key]), key
    make_learner(node, 4, 3, seed=0)  # and it builds


def test_a_changed_python_default_changes_the_recorded_config(monkeypatch):
    """What ``ocl compare resume=true`` compares (a record's learner_config) sees a default that moved,
    though linear.yaml does not state it."""
    before = OmegaConf.to_container(learner_config("linear"))
    assert before["weight_decay"] == 0.0 and "weight_decay" not in resources.files("ocl.configs").joinpath(
        "learner", "linear.yaml").read_text()
    sig = inspect.signature(LinearLearner)
    params = [p.replace(default=0.5) if p.name == "weight_decay" else p for p in sig.parameters.values()]
    monkeypatch.setattr(LinearLearner, "__signature__", sig.replace(parameters=params), raising=False)
    after = OmegaConf.to_container(learner_config("linear"))
    assert after["weight_decay"] == 0.5 and {k: v for k, v in after.items() if k != "weight_decay"} == {
        k: v for k, v in before.items() if k != "weight_decay"}


def test_ocl_run_records_every_option_of_its_learner(tmp_path):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose(config_name="run", overrides=["learner=knn", "learner.k=3", "progress=false",
                                                    "protocol.max_examples=60", f"cache_dir={tmp_path / 'c'}"])
    res = run_experiment(cfg, tmp_path / "r")
    assert res["config"]["learner"] == {**OmegaConf.to_container(learner_config("knn")), "k": 3}
    assert "normalize" not in cfg.learner  # the caller's config is left as it was


def test_a_run_extracting_its_features_as_it_goes_equals_a_run_on_a_complete_cache(tmp_path, rowmeans_backbone):
    """ocl run on an empty cache extracts only its stream (and its tasks' test images), in the
    background; its results, step by step, are those of the same run on a complete cache entry."""
    import json

    import numpy as np

    from ocl.build import build, load_source
    from ocl.streams.prefetch import extract_features

    over = ["progress=false", "learner=ncm", "protocol.max_examples=300", "protocol.n_tasks=3",
            f"backbone._target_={rowmeans_backbone}", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose(config_name="run", overrides=over)
        full = compose(config_name="run", overrides=[*over[:-1], f"cache_dir={tmp_path / 'full'}"])
    run_experiment(cfg, tmp_path / "lazy")
    entries = list((tmp_path / "cache").iterdir())
    assert all((e / "rows").is_dir() and not (e / "features.npy").exists() for e in entries)  # partial: shards only
    src = load_source(full)
    ex = build(full, "backbone")
    for images in (src.train, src.test):
        extract_features(images, ex, tmp_path / "full", progress=False)  # complete entries, as ocl extract writes
    run_experiment(full, tmp_path / "complete")
    volatile = {"examples_per_second", "learn_seconds", "eval_seconds", "feature_seconds", "near_future_seconds",
                "config"}
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("lazy", "complete"))
    assert a["accuracy_matrix"] and {k: v for k, v in a.items() if k not in volatile} == {
        k: v for k, v in b.items() if k not in volatile}
    np.testing.assert_array_equal(np.load(tmp_path / "lazy" / "steps.npy"), np.load(tmp_path / "complete" / "steps.npy"))
    n_rows = sum(len(json.loads(p.read_text())["indices"]) for p in (tmp_path / "cache").glob("*/rows/*.json"))
    assert n_rows < len(src.train) + len(src.test)  # not the whole source
