"""The ``experts`` option from the command line (hydra overrides as ``ocl run`` composes them)
and the calibration wrapper (ocl/learners/pooled/experts.py)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from ocl.build import make_learner, with_learner_defaults
from ocl.learners.checks import clusters
from ocl.learners.common import Temperature
from ocl.learners.ncm import NCMLearner
from ocl.learners.pooled import PooledLearner
from ocl.learners.pooled.experts import Calibrated
from ocl.learners.slda import SLDALearner
from ocl.learners.transformer import TransformerLearner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def composed(*overrides: str):
    """``ocl run OVERRIDES``'s config (hydra's compose API, as the CLI composes it)."""
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name="run", overrides=list(overrides))


def test_the_default_learner_of_ocl_run_is_the_default_pool():
    cfg = composed()
    learner = make_learner(cfg.learner, 8, 3, seed=0)
    assert isinstance(learner, PooledLearner) and learner.expert_names == ["transformer", "linear", "slda"]


def test_a_list_of_names_from_the_command_line():
    """``ocl run learner=pooled 'learner.experts=[transformer,ncm]'``."""
    cfg = composed("learner=pooled", "learner.experts=[transformer,ncm]")
    learner = make_learner(cfg.learner, 8, 3, seed=0)
    assert learner.expert_names == ["transformer", "ncm"]
    assert [type(e) for e in learner.experts] == [TransformerLearner, NCMLearner]
    # what a run records: the experts as given, the pool's options filled in with their defaults
    recorded = with_learner_defaults(cfg).learner
    assert list(recorded.experts) == ["transformer", "ncm"] and recorded.heldout_skip == 64


def test_mappings_with_options_and_a_plug_in_from_the_command_line():
    """Options of one expert, and your own learner by ``_target_`` (not built by hydra itself:
    the pooled configs say ``_recursive_: false``)."""
    cfg = composed("learner=readout_pool",
                   "learner.experts=[{name:slda,shrinkage:0.3,calibrate:false},"
                   "{_target_:ocl.learners.ncm.NCMLearner,floor:0.2,calibrate:true}]")
    learner = make_learner(cfg.learner, 8, 3, seed=0)
    slda, ncm = learner.experts
    assert isinstance(slda, SLDALearner) and slda.shrinkage == 0.3
    assert isinstance(ncm, Calibrated) and isinstance(ncm.inner, NCMLearner) and ncm.inner.floor == 0.2
    assert learner.expert_names == ["slda", "NCMLearner"]


def test_calibrated_steps_its_temperature_on_the_chunk_as_scored_then_the_expert_learns():
    x, y = clusters(20)
    wrapped, alone, temperature = Calibrated(SLDALearner(8, 3), lr=0.05), SLDALearner(8, 3), Temperature(0.05)
    for s in range(0, 20, 2):
        raw = alone.predict(x[s : s + 2])
        torch.testing.assert_close(wrapped.predict(x[s : s + 2]), temperature(raw), rtol=0, atol=0)
        temperature.step(raw, y[s : s + 2])
        wrapped.update(x[s : s + 2], y[s : s + 2])
        alone.update(x[s : s + 2], y[s : s + 2])
    assert wrapped.temperature.log_scale == temperature.log_scale != 0.0
    torch.testing.assert_close(wrapped.evaluate(x), temperature(alone.evaluate(x)), rtol=0, atol=0)
    # an update without its predict: the expert scores the chunk then (as it would have)
    wrapped.update(x[:2], y[:2])
    temperature.step(alone.predict(x[:2]), y[:2])
    assert wrapped.temperature.log_scale == temperature.log_scale


def test_the_pool_names_its_experts_in_results(tmp_path):
    """``results.json``: the learner is "pooled" and lists its experts."""
    from ocl.run import run_experiment

    cfg = composed("learner=readout_pool", "stream=digits", "protocol.max_examples=40", "progress=false",
                   "eval_test=false", f"cache_dir={tmp_path / 'cache'}")
    res = run_experiment(cfg, tmp_path / "run")
    assert res["learner"] == "pooled" and res["experts"] == ["linear", "slda"]
