"""Adapter that runs Avalanche's own strategies (Naive, Replay, ER-ACE, GDumb) on our stream.

The comparison is against the peer implementation, not a re-implementation: the strategy
object from ``avalanche.training`` owns a small head (linear or one hidden layer over the
D-dim features) and its optimizer, and it is trained with ``strategy.train(experience)``
on experiences built from the revealed tensors (task label 0).

Prequential order is kept: :meth:`predict` runs the strategy's current model (eval mode,
``log_softmax``) before :meth:`update` hands the labels over. Because Avalanche's
per-experience overhead is large (dataloaders, plugin callbacks, and replay buffers made of
concatenated and subsetted datasets whose cost grows with the number of source
experiences they hold), revealed examples are collected into mini-experiences of at least
``experience_size`` examples before each ``strategy.train`` call. Every example is
still predicted before the strategy trains on it; the model is just updated every
``experience_size`` examples instead of after every chunk. ``experience_size=1`` trains
after every chunk, the exact protocol, at Avalanche's full per-call cost.

Measured on scikit-learn digits (D=64, K=10, 1797 examples, chunk C=1, one CPU thread,
linear head, memory 1000; 2026-12-01, ``compact_every`` 32 vs 0 = Avalanche's own growth):
with ``experience_size=1`` Naive runs at ~460 examples/s, Replay at 84 (13 without
compaction), ER-ACE at 145 (23); with ``experience_size=10`` (default) Naive ~860, Replay
~335 (307), ER-ACE ~280 (185). The gap widens with the stream: see below.

Strategy semantics follow Avalanche: each mini-experience is one Avalanche experience,
``current_experience`` counts them.

Memory compaction (the one thing the adapter does to Avalanche's state). Avalanche's
reservoir buffers are lazy views: ``update_from_dataset`` concatenates the new data with
the buffer and takes a subset, and the subset keeps a reference to *every* source dataset
ever concatenated, referenced or not (``FlatData`` only merges duplicates). With one
experience per 10 examples, each buffer update then costs time linear in the number of
experiences so far (quadratic over the stream) and the memory keeps every feature vector
of the stream alive: in ``ocl compare`` on the 50,000-example CIFAR-10 split (D=3072, two
workers on two cores) Replay averaged 46 examples/s and ER-ACE 66 without compaction (251 and
285 over a 10k-example split), 397 and 369 with it, with identical metrics. So every
``compact_every`` experiences each reservoir buffer is replaced by a fresh dataset holding
the same items in the same order (its sampling weights untouched): the strategy sees the
same memory, draws the same random numbers and makes bit-identical predictions
(``tests/learners/test_avalanche.py``), at a cost bounded by the memory size.

- ``naive``: ``Naive``, fine-tuning on each experience.
- ``replay``: ``Replay``. Avalanche's default memory (``ExperienceBalancedBuffer``) splits
  ``mem_size`` evenly over experiences seen; with thousands of tiny experiences it freezes
  once there are more experiences than slots, so ``replay_storage: reservoir`` (default)
  swaps in ``ReservoirSamplingBuffer``, the usual online-CL setup in Avalanche examples.
  Memory batches of ``batch_size_mem`` are concatenated to every mini-batch.
- ``er_ace``: ``ER_ACE`` (class-balanced memory, asymmetric cross-entropy). With one
  class in the incoming mini-batch its "current" loss term is zero, so new examples are
  learnt only once they are replayed from memory (they enter it before training).
- ``gdumb``: ``GDumb``: at every experience the model is reset to its initial weights and
  trained from scratch for ``train_epochs`` on the class-balanced memory only. Predictions
  between retrains come from the last retrained model. Expensive, hence a larger
  ``experience_size`` in its config.
"""

from __future__ import annotations

import copy

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.learners.common import RunningStandardizer, make_head, make_optimizer

if TYPE_CHECKING:
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

log = logging.getLogger(__name__)

STRATEGIES = ("naive", "replay", "er_ace", "gdumb")


def make_experience(x: torch.Tensor, y: torch.Tensor, index: int) -> DatasetExperience:
    """A one-off Avalanche experience over ``x: (N, D)``, ``y: (N,)`` with task label 0.

    Items are ``(x, y, 0)`` triples, as Avalanche's task-aware classification datasets
    yield them (replay buffers and ER-ACE's memory loader expect the task label).
    """
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
    from avalanche.benchmarks.utils import (
        ConstantSequence,
        DataAttribute,
        TaskAwareSupervisedClassificationDataset,
    )

    n = y.shape[0]
    data = TaskAwareSupervisedClassificationDataset(
        [TensorDataset(x, y)],
        data_attributes=[
            DataAttribute(y.tolist(), "targets"),
            DataAttribute(ConstantSequence(0, n), "targets_task_labels", use_in_getitem=True),
        ],
    )
    return DatasetExperience(dataset=data, current_experience=index)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow Avalanche's warnings (deprecations, "no loggers") and restore the filters.

    ``record=True`` rather than an "ignore" filter: Avalanche's deprecation wrapper pushes
    its own "once" filter in front of ours on every call.
    """
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        yield


class AvalancheLearner(Learner):
    """Runs an Avalanche strategy prequentially over feature chunks.

    Args:
        feature_dim: D.
        num_classes: K.
        seed: seeds the head's initialisation and the strategy's randomness (shuffling,
            buffer sampling), which runs on a private copy of torch's global RNG.
        strategy: ``"naive"``, ``"replay"``, ``"er_ace"`` or ``"gdumb"``.
        hidden: hidden width of the head (``0`` = linear head).
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        standardize: standardise features with running statistics before the strategy
            sees them (memories keep features as standardised when they were revealed).
        experience_size: revealed examples collected per Avalanche experience (>= 1).
        train_mb_size: strategy mini-batch size; ``None`` = the runner's chunk size C.
        train_epochs: epochs per experience (over the memory, for GDumb).
        mem_size: memory size of replay / ER-ACE / GDumb.
        batch_size_mem: memory examples per mini-batch (replay, ER-ACE).
        replay_storage: ``"reservoir"`` or ``"experience_balanced"`` (Avalanche's default).
        device: torch device of the strategy's model.
        compact_every: experiences between memory compactions (see the module docstring;
            ``0`` = never, Avalanche's own growth).
    """

    name = "avalanche"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        seed: int = 0,
        strategy: str = "naive",
        hidden: int = 0,
        lr: float = 0.5,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        standardize: bool = True,
        experience_size: int = 10,
        train_mb_size: int | None = None,
        train_epochs: int = 1,
        mem_size: int = 1000,
        batch_size_mem: int = 10,
        replay_storage: str = "reservoir",
        device: str = "cpu",
        compact_every: int = 32,
    ) -> None:
        if strategy not in STRATEGIES:
            raise OCLError(f"avalanche: strategy must be one of {STRATEGIES}; got {strategy!r}.")
        if replay_storage not in ("reservoir", "experience_balanced"):
            raise OCLError(
                f"avalanche: replay_storage must be 'reservoir' or 'experience_balanced'; got {replay_storage!r}."
            )
        if experience_size < 1 or train_epochs < 1 or (train_mb_size is not None and train_mb_size < 1):
            raise OCLError("avalanche: experience_size, train_epochs and train_mb_size must be >= 1.")
        if compact_every < 0:
            raise OCLError(f"avalanche: compact_every must be >= 0 (0 = never); got {compact_every}.")
        super().__init__(feature_dim, num_classes, seed)
        self.compact_every = compact_every
        self.name = f"avalanche_{strategy}"
        self.strategy_name = strategy
        self.experience_size = experience_size
        self.fixed_mb_size = train_mb_size
        self.device = torch.device(device)
        self.norm = RunningStandardizer(feature_dim) if standardize else None
        gen = torch.Generator().manual_seed(seed)
        self._rng_state = gen.get_state()  # private stream for Avalanche's global-RNG draws
        model = make_head(feature_dim, num_classes, hidden, seed).to(self.device)
        opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
        with _quiet():
            self.strategy = self._build(strategy, model, opt, train_epochs, mem_size, batch_size_mem, replay_storage)
        self._pending_x: list[torch.Tensor] = []
        self._pending_y: list[torch.Tensor] = []
        self._n_pending = 0
        self._n_experiences = 0
        log.debug("avalanche %s: %s", strategy, type(self.strategy).__name__)

    def _build(
        self,
        strategy: str,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        train_epochs: int,
        mem_size: int,
        batch_size_mem: int,
        replay_storage: str,
    ):
        """The Avalanche strategy object, with a silent evaluator (no metrics, no loggers)."""
        from avalanche.training import ER_ACE, GDumb, Naive, Replay
        from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        common = dict(
            model=model,
            optimizer=opt,
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=self.fixed_mb_size or 1,  # reset per experience when None
            train_epochs=train_epochs,
            eval_mb_size=256,
            device=self.device,
            evaluator=EvaluationPlugin(loggers=[], collect_all=False),  # no metrics, no printing
            eval_every=-1,
        )
        if strategy == "naive":
            return Naive(**common)
        if strategy == "gdumb":
            return GDumb(mem_size=mem_size, **common)
        if strategy == "er_ace":
            return ER_ACE(mem_size=mem_size, batch_size_mem=batch_size_mem, **common)
        s = Replay(mem_size=mem_size, **common)
        plugin = next(p for p in s.plugins if isinstance(p, ReplayPlugin))
        plugin.batch_size_mem = batch_size_mem  # Replay's constructor does not expose it
        if replay_storage == "reservoir":
            plugin.storage_policy = ReservoirSamplingBuffer(max_size=mem_size)
        return s

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run Avalanche (which draws from torch's global RNG) on this learner's own stream."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        model = self.strategy.model  # GDumb replaces the model object at every experience
        was_training = model.training
        model.eval()
        try:
            logits = model(self._features(x).to(self.device))  # (C, K)
        finally:
            model.train(was_training)
        return F.log_softmax(logits.float(), dim=1).cpu()

    def frozen(self) -> AvalancheLearner:
        """A copy that predicts with a copy of the current model (and input statistics); it shares
        the rest of the strategy, whose state after training holds tensors ``copy.deepcopy``
        refuses (outputs attached to the autograd graph), so it must not learn."""
        snap = copy.copy(self)
        snap.strategy = copy.copy(self.strategy)
        snap.strategy.model = copy.deepcopy(self.strategy.model)
        snap.norm = copy.deepcopy(self.norm)
        return snap

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.check(x, y)
        self._pending_x.append(self._features(x).float().clone())
        self._pending_y.append(y.long().clone())
        self._n_pending += x.shape[0]
        if self.norm is not None:
            self.norm.update(x)
        if self.fixed_mb_size is None:
            self.strategy.train_mb_size = x.shape[0]  # one mini-batch per chunk, as in the runner
        if self._n_pending >= self.experience_size:
            self._train_pending()

    def on_task_boundary(self, task: int) -> None:
        """Train on whatever was revealed but not yet handed to the strategy."""
        self._train_pending()

    def _train_pending(self) -> None:
        if self._n_pending == 0:
            return
        exp = make_experience(torch.cat(self._pending_x), torch.cat(self._pending_y), self._n_experiences)
        self._pending_x, self._pending_y, self._n_pending = [], [], 0
        with _quiet(), self._own_rng():
            self.strategy.train(exp, eval_streams=[])
        self._n_experiences += 1
        if self.compact_every and self._n_experiences % self.compact_every == 0:
            self._compact_memory()

    def _reservoirs(self) -> list[ReservoirSamplingBuffer]:
        """The strategy's reservoir buffers: ER-ACE's and GDumb's per-class groups, Replay's
        buffer (or its per-experience groups)."""
        from avalanche.training.storage_policy import BalancedExemplarsBuffer, ReservoirSamplingBuffer

        policies = [getattr(self.strategy, "storage_policy", None)]
        policies += [getattr(p, "storage_policy", None) for p in self.strategy.plugins]
        out = []
        for policy in policies:
            if isinstance(policy, BalancedExemplarsBuffer):
                out += [g for g in policy.buffer_groups.values() if isinstance(g, ReservoirSamplingBuffer)]
            elif isinstance(policy, ReservoirSamplingBuffer):
                out.append(policy)
        return out

    def _compact_memory(self) -> None:
        """Replace each reservoir's lazy buffer view by a dataset of its own items (same order)."""
        for res in self._reservoirs():
            n = len(res.buffer)
            if n == 0:
                continue
            items = [res.buffer[i] for i in range(n)]  # (x, y, task label) triples
            x = torch.stack([it[0] for it in items])  # (n, D)
            y = torch.tensor([int(it[1]) for it in items])  # (n,)
            res.buffer = make_experience(x, y, 0).dataset
