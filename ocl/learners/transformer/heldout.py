"""Held-out evaluation of the transformer learner: ``evaluate`` (each held-out example as the next
example of a cache, independently of the others), the caches it attends to (``eval_context``), and
``frozen`` copies that keep evaluating as the learner did when they were made."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ocl.learners.transformer.learner import TransformerLearner


class HeldOutEvaluation:
    """What :class:`~ocl.learners.transformer.TransformerLearner` does with examples that are not
    the stream's (a mixin: it reads the learner's network, caches and options)."""

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Held-out log-probs ``(N, K)`` of ``x (N, D)`` (on ``x``'s device): each example attends to
        the caches ``eval_context`` names as if it were their next example, independently of the
        others. No state changes."""
        xd, _ = self._check(x)
        self._set_training(False)
        rows, ctx_pos = self._eval_context()
        n, tpe = ctx_pos.shape[0], self.model.tokens_per_example
        qpos = (ctx_pos.max(1).values // tpe + 1).clamp_min(0) if self.cfg.eval_context == "replay" else \
            torch.full((n,), self.t, device=self.device)  # (n,) each query as its stream's next example
        out = []
        for s in range(0, xd.shape[0], self.cfg.eval_batch):
            xb = xd[s : s + self.cfg.eval_batch][None].expand(n, -1, -1)  # (n, N', D)
            pos = qpos[:, None].expand(n, xb.shape[1])  # (n, N')
            q_lo = None if self.cfg.segment == 1 else (pos - self.cfg.window) * tpe  # its stream's last W examples
            logits = self._stream_forward(xb, None, pos, rows, ctx_pos, isolated=True, q_lo=q_lo)[0]  # (n, N', K)
            lp = F.log_softmax(logits * self._scale(), dim=2)
            out.append(torch.logsumexp(lp, 0) - math.log(n))  # the contexts' average distribution
        log_probs = torch.cat(out) if out else torch.zeros(0, self.K, device=self.device)
        return log_probs.to(x.device)

    def frozen(self) -> TransformerLearner:
        """A copy whose :meth:`evaluate` stays what this learner's is now: its own network, caches
        and temperature; no optimizer, replay history (on disk: it is not copied) or cursors, so
        it cannot learn. The pooled learner's held-out pool scores later examples with it
        (``heldout_scores=lagged``)."""
        frozen = copy.copy(self)
        frozen.model, frozen.cache = copy.deepcopy(self.model), copy.deepcopy(self.cache)
        frozen.temperature = copy.deepcopy(self.temperature)
        frozen.opt = frozen.history = frozen.cursors = frozen.graphs = frozen._pending = None
        frozen._segment = []
        return frozen

    def _eval_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows ``(n,)`` and slot positions ``(n, S)`` that held-out examples attend to
        (``eval_context``): stream 0's cache; each non-empty replay cache (their predictions are
        averaged: a held-out example is not the stream's next one, so the current run of labels
        should not decide it; none yet: no context); or no context (every slot masked)."""
        mode = self.cfg.eval_context
        rows = torch.arange(1, self.R, device=self.device) if mode == "replay" else self._rows_all[:1]
        ctx_pos = self.cache.positions(rows)
        if mode == "replay":
            keep = (ctx_pos >= 0).any(1)
            rows, ctx_pos = rows[keep], ctx_pos[keep]
        if mode == "none" or rows.numel() == 0:
            rows = self._rows_all[:1]
            ctx_pos = torch.full_like(self.cache.positions(rows), -1)
        return rows, ctx_pos

