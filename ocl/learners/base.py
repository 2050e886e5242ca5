"""The learner interface every online learner implements.

The runner drives a learner strictly prequentially, one chunk at a time::

    logp = learner.predict(x)      # (C, K) log-probabilities; no label visible
    tracker.record(logp, y)        # scored before any update
    learner.update(x, y)           # learn from the now-revealed labels

A learner must never let ``predict`` depend on a label it has not yet been given
through ``update``. Learners are built by the runner as
``factory(feature_dim=D, num_classes=K, seed=s)`` where ``factory`` is the hydra
``learner`` config instantiated with ``_partial_: true``.

What every learner promises (``tests/learners/test_contract.py`` checks each shipped one
and the README's example, :mod:`ocl.learners.checks`): finite, normalised log-probabilities;
``predict`` blind to the labels of its chunk and later ones; the same seed gives the same
run; a pickled learner resumes exactly; ``evaluate`` changes nothing; a chunk of the wrong
shape or labels out of range raise :class:`~ocl.errors.OCLError` (:meth:`Learner.check`).
"""

from __future__ import annotations

import abc
import copy
from pathlib import Path

import torch

from ocl.errors import OCLError


class Learner(abc.ABC):
    """An online classifier over feature vectors.

    Args (of every subclass constructor, passed by the runner):
        feature_dim: D, the size of each input feature vector.
        num_classes: K, the number of output classes.
        seed: seed for any randomness inside the learner.

    A subclass calls ``super().__init__(feature_dim, num_classes)`` (which keeps D and K as
    :attr:`feature_dim` and :attr:`num_classes`) and :meth:`check` on the inputs of its
    ``predict``, ``update`` and ``evaluate``.
    """

    #: The learner's name in tables, logs and result files.
    name: str = "learner"
    #: For a constructor that takes ``**options``: the dataclass whose fields they are, so that
    #: the runner can check option names and value types before building (see
    #: :func:`ocl.build.check_options`). ``None``: the constructor's signature says it all.
    options: type | None = None
    #: Updates skipped because their loss (or a gradient) was not finite, counted by learners
    #: that take gradient steps (and reported with the results); ``None``: the learner takes
    #: none (or does not count them).
    skipped_updates: int | None = None
    #: Whether the pooled learner (``learner=pooled``) calibrates this learner's log-probabilities
    #: with an online temperature of its own by default (an expert item's ``calibrate`` says
    #: otherwise): for learners whose probabilities are far too sharp or too flat (SLDA).
    pool_calibrate: bool = False

    def __init__(self, feature_dim: int, num_classes: int, seed: int = 0) -> None:
        self.feature_dim, self.num_classes = int(feature_dim), int(num_classes)

    def check(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Refuse a chunk this learner cannot take, with an :class:`OCLError` that says why.

        Args:
            x: must be ``(C, D)`` floating-point features (the runner passes float32).
            y: when given, must be ``(C,)`` int64 labels in ``[0, K)``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.feature_dim or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise OCLError(f"{self.name}: features must be a float tensor of shape (C, {self.feature_dim}); got {got}.")
        if y is None:
            return
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.dtype != torch.int64:
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise OCLError(f"{self.name}: labels must be an int64 tensor of shape ({x.shape[0]},) for a chunk of "
                           f"{x.shape[0]}; got {got}.")
        if y.numel():
            lo, hi = (int(v) for v in torch.aminmax(y))
            if lo < 0 or hi >= self.num_classes:
                raise OCLError(f"{self.name}: labels must lie in [0, {self.num_classes}); got range [{lo}, {hi}].")

    @abc.abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predict a chunk before its labels are revealed.

        Args:
            x: ``(C, D)`` float32 features of the next C examples, in stream order.
        Returns:
            ``(C, K)`` log-probabilities (each row log-sum-exps to 0).
        """

    @abc.abstractmethod
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Learn from the chunk just predicted, now that its labels are revealed.

        Args:
            x: ``(C, D)`` the same features just passed to :meth:`predict`.
            y: ``(C,)`` int64 labels in ``[0, K)``.
        """

    def on_task_boundary(self, task: int) -> None:
        """Called when the stream's task index changes (only protocols that have tasks).

        Most online learners ignore it (they are task-free); baselines that need it override.
        """

    def set_workdir(self, path: Path) -> None:
        """Called once before the first chunk with the run directory: a learner may keep large
        state there on disk (e.g. the transformer's replay history) instead of in memory, so
        that it survives in checkpoints. Default: nothing."""

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities for data the learner does not learn from, without changing any
        state that later predictions depend on (``(N, D) -> (N, K)``).

        The runner calls it on held-out test sets at task boundaries and, for near-future
        accuracy, on one upcoming stream input every m steps, between one chunk's
        :meth:`update` and the next :meth:`predict`. Defaults to :meth:`predict`; learners
        whose ``predict`` uses or changes a stream context (e.g. a KV cache) override this
        with a context-free evaluation. A cache that the next ``predict`` would fill the same
        way (SLDA's lazily refreshed precision) may be filled here.
        """
        return self.predict(x)

    def frozen(self) -> Learner:
        """A copy whose :meth:`evaluate` gives what this learner's gives now, and keeps giving it
        while this one learns on: the pooled learner scores later examples with its experts as
        they stood (``heldout_scores=lagged``). The copy need not learn.

        Default: a deep copy. A learner that keeps state outside the object (a side file on
        disk, e.g. the transformer's replay history) or much that :meth:`evaluate` never reads
        overrides it with a copy of only what :meth:`evaluate` needs.
        """
        return copy.deepcopy(self)
