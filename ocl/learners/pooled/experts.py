"""The pooled learner's experts: the ``experts`` option resolved into learners, and the online
temperature that calibrates an expert (:class:`Calibrated`).

An item of ``experts`` is one of:

- a shipped learner's name (``configs/learner/<name>.yaml``, as ``learner=<name>`` takes it):
  ``transformer``, ``linear``, ``slda``, ``ncm``, ...;
- a mapping with ``name`` (a shipped learner) and options that override its config, e.g.
  ``{name: transformer, window: 32}``;
- a mapping with ``_target_`` (your own :class:`~ocl.learners.base.Learner` subclass, a
  plug-in, as ``learner._target_`` takes it) and its options; ``name`` then only labels it.

Either mapping may hold ``calibrate: true|false``, the pooled learner's own key (``name`` and
``calibrate`` never reach the learner): whether the pool calibrates that expert with an online
temperature (default: the learner class's :attr:`~ocl.learners.base.Learner.pool_calibrate`,
true for SLDA only). Every expert is
built like ``learner=<name>`` builds it (:func:`ocl.build.learner_config`,
:func:`ocl.build.make_learner`: its options are checked, unknown ones refused) with the pooled
learner's feature size, classes and seed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.learners.common import Temperature


class Calibrated(Learner):
    """An expert whose log-probabilities ``lp (C, K)`` the pool sees as ``log_softmax(lp * e^s)``,
    with ``s`` an online :class:`~ocl.learners.common.Temperature` stepped on each chunk as the
    expert scored it, before the expert learns that chunk (so it never sees a label early).

    Args:
        inner: the expert. lr: the temperature's Adam step size.
    """

    def __init__(self, inner: Learner, lr: float) -> None:
        super().__init__(inner.feature_dim, inner.num_classes)
        self.inner, self.temperature = inner, Temperature(lr)
        self.name = inner.name
        self._scored: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, the expert's log-probs of x)

    @property
    def skipped_updates(self) -> int | None:  # type: ignore[override]
        return self.inner.skipped_updates

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.inner.predict(x)
        self._scored = (x, raw)  # update() steps the temperature on these: no second predict
        return self.temperature(raw)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        seen, raw = self._scored or (None, None)
        self._scored = None
        same = seen is not None and (seen is x or torch.equal(seen, x))
        self.temperature.step(raw if same else self.inner.predict(x), y)
        self.inner.update(x, y)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return self.temperature(self.inner.evaluate(x))

    def on_task_boundary(self, task: int) -> None:
        self.inner.on_task_boundary(task)

    def set_workdir(self, path: Path) -> None:
        self.inner.set_workdir(path)

    def frozen(self) -> Calibrated:
        snap = copy.copy(self)
        snap.inner, snap.temperature, snap._scored = self.inner.frozen(), copy.deepcopy(self.temperature), None
        return snap


def expert_nodes(experts: Sequence[Any]) -> list[tuple[str, Any, bool | None]]:
    """``experts`` items -> ``(label, learner config node, calibrate or None)`` each, every node
    checked to name a shipped learner or a ``_target_`` (see the module docstring).

    Raises:
        OCLError: an empty list, an item that is neither a name nor a mapping, or one that names
            neither a shipped learner nor a ``_target_``.
    """
    from ocl.build import available_learners, learner_config  # the CLI's machinery (imports this package's users)

    if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence) or not experts:
        raise OCLError(f"learner.experts={experts!r}: must be a non-empty list of learners, e.g. "
                       "'learner.experts=[transformer,linear,slda]'.")
    valid = available_learners()
    out = []
    for i, item in enumerate(experts):
        where = f"learner.experts[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping):
            raise OCLError(f"{where}={item!r}: must be a learner's name or a mapping with `name` or `_target_`.")
        options = dict(item)
        name, calibrate = options.pop("name", None), options.pop("calibrate", None)
        if calibrate is not None and not isinstance(calibrate, bool):
            raise OCLError(f"{where}.calibrate={calibrate!r}: must be true or false.")
        if name is None and "_target_" not in options:
            raise OCLError(f"{where}={item!r}: needs `name` (a shipped learner) or `_target_` (your own).")
        if name is not None and name not in valid and "_target_" not in options:
            raise OCLError(f"{where}: unknown learner {name!r}; valid learners: {', '.join(valid)} "
                           f"(or your own: {{_target_: pkg.module.Class, ...}}).")
        label = str(name) if name is not None else str(options["_target_"]).rsplit(".", 1)[-1]
        out.append((label, learner_config(label, options), calibrate))
    return out


def build_experts(experts: Sequence[Any], feature_dim: int, num_classes: int, seed: int,
                  temp_lr: float) -> tuple[list[str], list[Learner]]:
    """The experts of ``experts`` built for D = ``feature_dim``, K = ``num_classes`` with
    ``seed``, each wrapped in :class:`Calibrated` where it is calibrated. Returns their
    labels (for results and logs) and the learners."""
    from ocl.build import make_learner

    labels, learners = [], []
    for i, (label, node, calibrate) in enumerate(expert_nodes(experts)):
        learner = make_learner(node, feature_dim, num_classes, seed, what=f"learner.experts[{i}]")
        if calibrate if calibrate is not None else learner.pool_calibrate:
            learner = Calibrated(learner, temp_lr)
        labels.append(label)
        learners.append(learner)
    return labels, learners
