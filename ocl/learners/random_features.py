"""Fixed random feature maps, and the base of the learners that put a closed-form classifier on
them (:mod:`ocl.learners.ranpac`, :mod:`ocl.learners.randumb`): the map, the probability floor
and an online temperature, so that each learner only says how it scores and learns."""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.learners.common import Temperature


class RandomFeatures:
    """A frozen random map ``(C, D) -> (C, M)``, drawn once from a private generator (seeded).

    ``kind="relu"`` (RanPAC): ``h = relu(x W)``, ``W ~ N(0, 1/D)`` (D, M): a random projection
    with a nonlinearity, so that a linear read-out of ``h`` is a nonlinear function of ``x``.
    (The paper draws ``W ~ N(0, 1)``; the ``1/D`` only rescales ``h``, which the ridge grid absorbs.)

    ``kind="fourier"`` (RanDumb): random Fourier features (Rahimi & Recht 2007),
    ``h = sqrt(2/M) cos(x W + b)``, ``W ~ N(0, 2 gamma)``, ``b ~ U[0, 2 pi)``: ``h(x) . h(x')``
    approximates the RBF kernel ``exp(-gamma ||x - x'||^2)`` (scikit-learn's ``RBFSampler``).

    Args:
        feature_dim: D.
        dim: M, the number of random features.
        seed: seeds the map (and nothing else).
        kind: ``"relu"`` or ``"fourier"``.
        gamma: RBF kernel width (``"fourier"`` only).
        normalize: L2-normalise ``x`` first (then ``||x - x'||^2`` lies in ``[0, 4]`` whatever the
            backbone's scale, so one ``gamma`` fits every backbone).
    """

    def __init__(self, feature_dim: int, dim: int, seed: int, kind: str = "relu", gamma: float = 1.0,
                 normalize: bool = False) -> None:
        if kind not in ("relu", "fourier"):
            raise OCLError(f"random features: kind must be 'relu' or 'fourier'; got {kind!r}.")
        if not isinstance(dim, int) or dim < 1 or not gamma > 0:
            raise OCLError(f"random features: need an integer dim >= 1 and gamma > 0; got {dim!r}, {gamma!r}.")
        g = torch.Generator().manual_seed(int(seed))
        self.kind, self.normalize, self.dim = kind, normalize, dim
        if kind == "relu":
            self.weight = torch.randn(feature_dim, dim, generator=g) / math.sqrt(feature_dim)  # (D, M)
            self.bias = None
        else:
            self.weight = torch.randn(feature_dim, dim, generator=g) * math.sqrt(2 * gamma)
            self.bias = torch.rand(dim, generator=g) * (2 * math.pi)  # (M,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(C, D)`` float features -> ``(C, M)`` float32 random features."""
        x = x.float()
        if self.normalize:
            x = F.normalize(x, dim=1)
        if self.kind == "relu":
            return torch.relu(x @ self.weight)
        return torch.cos(torch.addmm(self.bias, x, self.weight)).mul_(math.sqrt(2 / self.dim))


class RandomFeatureLearner(Learner):
    """Base: a :class:`RandomFeatures` map, a classifier of the mapped features that scores the
    classes seen so far (:meth:`scores`, :meth:`learn`, :meth:`seen`: the subclass), and calibration

        p(k | x) = (1 - floor) * softmax_k(score_k(h(x)) * t) + floor / K   (seen classes k)

    with never-seen classes at ``floor / K`` and ``t`` an online temperature
    (:class:`~ocl.learners.common.Temperature`: one Adam step on each chunk's
    log-loss, on the scores that chunk got before its labels were revealed, so it never sees a
    label early; examples of classes not seen when they were scored carry no information about
    ``t`` and are left out of its step). Before any label the prediction is uniform.

    Args:
        feature_dim, num_classes, seed: as every learner's.
        features: the map (built by the subclass from its options).
        floor: weight of the uniform mixture, in (0, 1).
        temp_lr: Adam step size of the log-temperature (0: no calibration, ``t`` stays ``temp_init``).
        temp_init: the temperature's starting value.
    """

    def __init__(self, feature_dim: int, num_classes: int, seed: int, features: RandomFeatures, floor: float,
                 temp_lr: float, temp_init: float) -> None:
        if not 0 < floor < 1 or temp_lr < 0 or not temp_init > 0:
            raise OCLError(f"{self.name}: need 0 < floor < 1, temp_lr >= 0, temp_init > 0; "
                           f"got {floor}, {temp_lr}, {temp_init}.")
        super().__init__(feature_dim, num_classes, seed)
        self.features, self.floor = features, floor
        self.temperature = Temperature(temp_lr)
        self.temperature.log_scale = math.log(temp_init)
        self._scored: tuple | None = None  # (x, h, seen, scores) of the last predicted chunk, for update

    @abc.abstractmethod
    def seen(self) -> torch.Tensor:
        """``(K,)`` bool: the classes the classifier has been given examples of."""

    @abc.abstractmethod
    def scores(self, h: torch.Tensor, for_update: bool = False) -> torch.Tensor:
        """``(C, K_seen)`` float64 raw scores of the seen classes for random features ``h (C, M)``.
        ``for_update``: the chunk will be learned next (the subclass may keep work for :meth:`learn`)."""

    @abc.abstractmethod
    def learn(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Learn random features ``h (C, M)`` float32 with labels ``y (C,)``."""

    def _log_probs(self, seen: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        c, k = scores.shape[0], self.num_classes
        if not bool(seen.any()):
            return torch.full((c, k), -math.log(k))
        p = torch.full((c, k), self.floor / k, dtype=torch.float64)
        p[:, seen] += (1 - self.floor) * torch.softmax(scores * self.temperature.scale, dim=1)
        return p.log().float()

    def _score(self, x: torch.Tensor, for_update: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(x)
        seen = self.seen().clone()
        scores = self.scores(h, for_update) if bool(seen.any()) else torch.zeros(x.shape[0], 0, dtype=torch.float64)
        return h, seen, scores

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        h, seen, scores = self._score(x, for_update=True)
        self._scored = (x, h, seen, scores)
        return self._log_probs(seen, scores)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        _, seen, scores = self._score(x, for_update=False)  # touches nothing update reuses
        return self._log_probs(seen, scores)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.check(x, y)
        scored, self._scored = self._scored, None
        same = scored is not None and (scored[0] is x or (scored[0].shape == x.shape and torch.equal(scored[0], x)))
        h, seen, scores = scored[1:] if same else self._score(x, for_update=True)
        known = seen[y]  # examples of classes seen when they were scored
        if bool(known.any()):
            column = torch.cumsum(seen, 0) - 1  # class -> its column among the seen ones
            self.temperature.step(scores[known], column[y[known]])
        self.learn(h, y)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_scored"] = None  # a cache keyed by tensor identity: meaningless after loading
        return state
