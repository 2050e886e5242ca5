"""The read-out experts the transformer's network is pooled with, and output calibration.

On frozen pretrained features a linear model learns a new class within tens of examples and
streaming LDA (a Gaussian classifier with one shared covariance) is hard to beat on a
stationary stream, while the network needs hundreds of steps before its in-weights and
in-context learning pay off and then wins where context matters. So the learner predicts
with a pool (:mod:`.mixture`) of its network and these read-outs of the same features
(``linear_expert``, ``slda_expert``; ``pool``). The network trains exactly as it would alone.

Prequential by construction: the pool's weights, SLDA's temperature and the read-outs only ever
learn from chunks that have already been scored (:meth:`ReadOuts.update` runs in ``update``).
"""

from __future__ import annotations

import copy
import math
from typing import Protocol

import torch
import torch.nn.functional as F

from ocl.learners.linear import LinearLearner
from ocl.learners.slda import SLDALearner
from ocl.learners.transformer.mixture import FixedShare, LogLinearPool
from ocl.learners.transformer.model import TransformerConfig


class Network(Protocol):
    """The learner's network as the held-out pool sees it (``TransformerLearner``)."""

    def heldout_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Held-out log-probs ``(C, K)`` of a chunk ``x (C, D)``."""

    def frozen_network(self) -> Network:
        """A copy whose held-out log-probs stay what they are now."""


class Temperature:
    """Output calibration ``logits * exp(s)``, s fitted online: one Adam step per scored chunk on
    that chunk's log-loss (the chunk was scored before, so the fit never sees a label early).

    One scalar needs no autograd and no optimizer object: the gradient has a closed form,
    ``d/ds CE(z e^s, y) = e^s * mean_i(sum_k p_ik z_ik - z_i,y_i)`` with ``p = softmax(z e^s)``,
    and the Adam update below is ``torch.optim.Adam``'s (default betas and eps), in floats.
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.log_scale = 0.0
        self.m = self.v = 0.0  # Adam's moments
        self.steps = 0

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    def step(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """One step on raw logits ``(C, K)`` and labels ``(C,)``; skipped if the gradient is not finite."""
        s = self.scale
        z = logits.detach().float()
        p = torch.softmax(z * s, dim=1)
        grad = s * float(((p * z).sum(1) - z.gather(1, y[:, None])[:, 0]).mean())
        if not math.isfinite(grad):
            return
        b1, b2 = self.betas
        self.steps += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        denom = math.sqrt(self.v) / math.sqrt(1 - b2**self.steps) + self.eps
        self.log_scale -= self.lr / (1 - b1**self.steps) * self.m / denom


class ReadOuts:
    """Experts ``[network, linear?, slda?]`` and the pool that combines them (``M`` experts).

    Args:
        feature_dim: D.
        num_classes: K.
        seed: the read-outs' seed.
        cfg: the learner's options (``linear_expert``, ``linear_lr``, ``slda_expert``, ``pool``,
            ``share``, ``temp_lr``, ``heldout_mixture``, ``heldout_scores``, ``heldout_lag``).
    """

    def __init__(self, feature_dim: int, num_classes: int, seed: int, cfg: TransformerConfig) -> None:
        self.linear = LinearLearner(feature_dim, num_classes, seed, lr=cfg.linear_lr) if cfg.linear_expert else None
        # SLDA's discriminants are overconfident (log-loss 1.35 nats where its accuracy beats the
        # network's on iid CIFAR-10) and the pool weighs experts by log-loss: SLDA gets its own
        # temperature, fitted like the network's on chunks already scored.
        self.slda = SLDALearner(feature_dim, num_classes, seed) if cfg.slda_expert else None
        self.slda_temperature = Temperature(cfg.temp_lr) if cfg.slda_expert else None
        M = 1 + cfg.linear_expert + cfg.slda_expert

        def pool() -> FixedShare | LogLinearPool:
            return LogLinearPool(M) if cfg.pool == "loglinear" else FixedShare(M, cfg.share)

        self.pool = pool()
        # Held-out predictions (evaluate: test sets, near-future accuracy) are not the stream's next
        # example, so the expert that wins online by following the current run of labels need not
        # win there. heldout_mixture: a second pool for them, fitted on held-out scores of the
        # experts (heldout_scores): "lagged", the newest chunk as the learner's evaluate() would have
        # scored it lag to 2 lag examples earlier (an evaluation that far ahead: frozen copies of
        # the experts, the network with its caches and both read-outs, renewed every lag
        # examples); "past", examples of the revealed past drawn by the learner (older than its
        # context) scored by the experts as they are (an evaluation on every class seen so far);
        # "mixed", those and the newest chunk as the online pool scored it, one step each (between
        # the two: near-future accuracy wants the current task, a test set every class seen).
        self.heldout = pool() if cfg.heldout_mixture else None
        self.heldout_scores = cfg.heldout_scores  # "lagged" | "past" | "mixed"
        self._past: list[tuple[torch.Tensor, torch.Tensor]] = []  # scored past examples still to learn from
        self.lag = cfg.heldout_lag
        self._lagged: tuple | None = None  # (network, linear, slda) copies, lag to 2 lag examples old
        self._newest: tuple | None = None  # the newest copies
        self._frozen_at = 0  # the example count they were made at
        self.t = 0  # examples learned
        self._slda_scored: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, SLDA's raw log-probs of x)

    #: heldout_scores=past|mixed: past examples scored per batch, then learned from one per chunk. A
    #: network forward per example cost 18-21% of a step at C = 1; one per 16 examples 2-7% (side by
    #: side, scripts/bench_speed.py), and the scores the pool learns from are at most 15 examples
    #: staler (of examples drawn from the whole revealed past, older than the context).
    PAST_BATCH = 16

    @property
    def past_wanted(self) -> int:
        """How many past examples :meth:`update` wants drawn for this chunk (0: none)."""
        wants = self.heldout is not None and self.heldout_scores != "lagged" and not self._past
        return self.PAST_BATCH if wants else 0

    def _freeze(self, network: Network) -> tuple:
        """Frozen copies of the experts as they stand now."""
        self._frozen_at = self.t
        return (network.frozen_network(), copy.deepcopy(self.linear) if self.linear is not None else None,
                self.slda.frozen() if self.slda is not None else None)

    def experts(self, net: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The experts' log-probs for a chunk ``x (C, D)``, the network's ``net (C, K)`` first,
        stacked ``(M, C, K)``."""
        experts = [net]
        if self.linear is not None:
            experts.append(self.linear.predict(x).to(net))
        if self.slda is not None:
            raw = self.slda.predict(x)
            self._slda_scored = (x, raw)  # update() fits the temperature on these: no second predict
            experts.append(self._calibrated(raw).to(net))
        return torch.stack(experts)

    def _scores(self, network: Network, linear: LinearLearner | None, slda: SLDALearner | None,
                x: torch.Tensor) -> torch.Tensor:
        """Held-out log-probs ``(M, C, K)`` of ``x (C, D)`` by these experts (SLDA calibrated)."""
        scores = [network.heldout_log_probs(x)]
        if linear is not None:
            scores.append(linear.predict(x))
        if slda is not None:
            scores.append(self._calibrated(slda.predict(x)))
        return torch.stack([sc.to(scores[0]) for sc in scores])

    def _calibrated(self, slda_raw: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(slda_raw * self.slda_temperature.scale, dim=1)

    def predict(self, experts: torch.Tensor) -> torch.Tensor:
        """The pool of ``experts (M, C, K)``: log-probs ``(C, K)``."""
        return self.pool.predict(experts)

    def evaluate(self, experts: torch.Tensor) -> torch.Tensor:
        """Held-out: the held-out pool's weights (``heldout_mixture``), else the online ones."""
        return (self.heldout or self.pool).predict(experts)

    def update(self, experts: torch.Tensor, x: torch.Tensor, y: torch.Tensor, network: Network,
               past: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """After a chunk was scored with ``experts (M, C, K)``: the pools learn how each expert did,
        then the read-outs learn the chunk ``x (C, D)``, ``y (C,)``. ``network``: the learner's
        network (``heldout_mixture``: scored, or copied every lag examples); ``past``: examples
        ``(P, D)``, ``(P,)`` of the revealed past (``heldout_scores=past|mixed``, :attr:`past_wanted`
        of them: scored now, learned from one per chunk; None: none drawn)."""
        self.pool.update(experts, y)
        if self.heldout is not None and self.heldout_scores == "lagged":
            if self._lagged is None:  # the first chunk: nothing learned yet
                self._lagged = self._newest = self._freeze(network)
            elif self.t // self.lag > self._frozen_at // self.lag:  # a multiple of lag passed since the newest
                self._lagged, self._newest = self._newest, self._freeze(network)
            self.heldout.update(self._scores(*self._lagged, x).to(experts), y)
        elif self.heldout is not None:
            if self.heldout_scores == "mixed":  # the newest chunk as the online pool saw it, too
                self.heldout.update(experts, y)
            if past is not None:
                xo, yo = past
                scores = self._scores(network, self.linear, self.slda, xo).to(experts)  # (M, P, K)
                self._past = list(zip(scores.split(1, dim=1), yo.split(1)))  # [((M, 1, K), (1,))] * P
            if self._past:
                self.heldout.update(*self._past.pop(0))
        if self.linear is not None:
            self.linear.update(x, y)
        if self.slda is not None:  # its temperature steps on the chunk as SLDA scored it, before it learns
            seen, raw = self._slda_scored or (None, None)
            self._slda_scored = None
            self.slda_temperature.step(raw if seen is x else self.slda.predict(x), y)
            self.slda.update(x, y)
        self.t += x.shape[0]
