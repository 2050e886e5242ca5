"""Each contract check (ocl.learners.checks) catches the break it is there for: a learner
broken in one way fails that check, and a sound one passes them all."""

import functools

import pytest
import torch

from ocl.learners import checks
from ocl.learners.base import Learner


class Counts(Learner):
    """Sound: smoothed class counts, ignores x (checks only what the contract asks)."""

    name = "counts"

    def __init__(self, feature_dim, num_classes, seed=0):
        super().__init__(feature_dim, num_classes)
        self.counts = torch.ones(num_classes)

    def predict(self, x):
        self.check(x)
        return (self.counts / self.counts.sum()).log().expand(x.shape[0], -1).clone()

    def update(self, x, y):
        self.check(x, y)
        self.counts += torch.bincount(y, minlength=self.num_classes)


class Unnormalised(Counts):
    def predict(self, x):
        return super().predict(x) + 0.1


class Peeking(Counts):
    """Returns a view of its state, which the next update changes: the logged prediction then
    depends on labels revealed after it."""

    def predict(self, x):
        self.check(x)
        self.logp = (self.counts / self.counts.sum()).log()[None].repeat(x.shape[0], 1)
        return self.logp

    def update(self, x, y):
        super().update(x, y)
        self.logp += torch.nn.functional.one_hot(y, self.num_classes).float().mean(0)


class GlobalRandom(Counts):
    """Draws from torch's global RNG instead of its seed."""

    def predict(self, x):
        return torch.log_softmax(super().predict(x) + torch.rand(self.num_classes), dim=1)


class Unpicklable(Counts):
    """Keeps a lambda: pickling it fails."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook = lambda: None


class LearnsInEvaluate(Counts):
    def evaluate(self, x):
        self.counts[0] += 1
        return self.predict(x)


class Unchecked(Counts):
    def update(self, x, y):
        self.counts += torch.bincount(y.clamp(0, self.num_classes - 1), minlength=self.num_classes)


def test_a_sound_learner_passes_every_check():
    checks.check_learner(Counts)


@pytest.mark.parametrize("broken,check", [
    (Unnormalised, checks.check_log_probs),
    (Peeking, checks.check_label_blind),
    (GlobalRandom, checks.check_same_seed),
    (Unpicklable, checks.check_resume),
    (LearnsInEvaluate, checks.check_evaluate_is_stateless),
    (Unchecked, checks.check_bad_inputs),
], ids=lambda v: getattr(v, "__name__", ""))
def test_each_check_catches_its_break(broken, check):
    with pytest.raises(AssertionError):
        check(functools.partial(broken))
