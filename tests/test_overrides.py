import pytest
from omegaconf import OmegaConf

from ocl.overrides import check_override_keys, unknown_key_message

CFG = OmegaConf.create({"seed": 0, "chunk_size": 1,
                        "learner": {"_target_": "ocl.learners.linear.LinearLearner", "_partial_": True, "lr": 1.0}})


@pytest.mark.parametrize("key,expect", [
    ("chunk_sise", "unknown config key `chunk_sise` (in chunk_sise=2); did you mean `chunk_size`? (chunk_size=2); "
                   "keys at the top level: seed, chunk_size, learner."),
    ("learner.lrr", "did you mean `learner.lr`? (learner.lr=2); keys under `learner`: lr."),
    ("learner.weight_decy", "did you mean `learner.weight_decay`? (+learner.weight_decay=2)"),  # an option, not listed
    ("learner.weight_decay", "learner.weight_decay: an option of LinearLearner that its config does not list; add it "
                             "with a leading +: +learner.weight_decay=2"),
    ("lerner.lr", "unknown config key `lerner` (in lerner.lr=2); did you mean `learner`? (learner.lr=2)"),
    ("zzz", "unknown config key `zzz` (in zzz=2); keys at the top level"),
])
def test_unknown_key_message(key, expect):
    assert expect in unknown_key_message(CFG, key, "2")


def test_valid_and_appended_overrides_pass(capsys):
    check_override_keys("run", ["learner=linear", "learner.lr=0.5", "+learner.weight_decay=0.1", "seed=3",
                                "hydra.run.dir=/tmp/x"])
    check_override_keys("run", ["learner=nosuchlearner"])  # not a key error: hydra reports it itself
    with pytest.raises(SystemExit) as e:
        check_override_keys("compare", ["learnrs=[linear]", "seeds=2"])
    assert e.value.code == 2 and "did you mean `learners`?" in capsys.readouterr().err
