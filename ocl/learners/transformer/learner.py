"""The transformer learner (the paper's network alone): predict/update over the stream, replay
streams, KV caches, the training step, held-out evaluation and the output temperature (see the
package docstring for the method)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.kernels import check_backend
from ocl.learners.base import Learner
from ocl.learners.common import Temperature
from ocl.learners.transformer.cuda_graphs import StepGraphs
from ocl.learners.transformer.flat_adamw import FlatAdamW
from ocl.learners.transformer.heldout import HeldOutEvaluation
from ocl.learners.transformer.kv_cache import KVCache
from ocl.learners.transformer.model import OnlineTransformer, TransformerConfig
from ocl.learners.memory import History
from ocl.learners.transformer.replay import ReplayCursors, StepBatch, stream_weights


class _Forward(NamedTuple):
    """A training forward over a batch, by ``predict`` or ``update``."""

    batch: StepBatch
    labelled: bool  # False: run without any label (see TransformerLearner.shares_forward)
    logits: torch.Tensor  # (B, C, K), attached to the autograd graph
    ks: list[torch.Tensor]  # per layer (B, H, T, Dh): the chunk's keys, for the cache
    vs: list[torch.Tensor]  # per layer (B, H, T, Dh): its values
    tpos: torch.Tensor  # (B, T) their token positions


class _Pending(NamedTuple):
    """What ``predict`` leaves for ``update`` of the same chunk."""

    x: torch.Tensor  # the chunk as the caller passed it (to recognise it)
    logits: torch.Tensor  # (C, K) raw logits it was scored with (temperature fit)
    forward: _Forward | None  # the training forward, when predict could run it (see shares_forward)
    kv: torch.Tensor | None  # (2, L, 1, H, T, Dh) predict's keys/values without labels (segment > 1), else None


class TransformerLearner(HeldOutEvaluation, Learner):
    """Online transformer learner (in-context + in-weights), see the module docstring.

    ``segment`` = G = 1: every chunk (``predict`` then ``update``) is one training forward over
    all R streams, one backward and one AdamW step. With C = 1 in kv mode the forward runs in
    ``predict`` and ``update`` reuses it (:meth:`shares_forward`); otherwise ``predict`` runs
    its own gradient-free forward of stream 0 with the chunk's labels "unknown".

    G > 1 (Transformer-XL training): ``predict`` is a gradient-free forward over stream 0's cache;
    ``update`` adds the chunk's keys/values, labels in, to it (kv mode at C = 1: predict's plus the
    label terms; else a labelled gradient-free forward); every G examples one step learns from
    segments (stream 0's last G examples, the replay streams' next G; loss on all G x R). Each
    query sees the context it is predicted with: the W examples before its chunk and its chunk's
    earlier ones (the cache holds W + G - 1 examples, ``q_lo`` masks).

    Args:
        feature_dim: D. num_classes: K. seed: seeds init, dropout and replay cursors.
        **config: fields of :class:`TransformerConfig`.

    Attributes:
        t: examples revealed so far (stream 0 position of the next example).
        skipped_updates: optimizer steps skipped because the loss was not finite.
    """

    name = "transformer"
    options = TransformerConfig  # the **config options (checked by the runner before building)

    def __init__(self, feature_dim: int, num_classes: int, seed: int = 0, **config) -> None:
        names = {f.name for f in dataclasses.fields(TransformerConfig)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise OCLError(f"unknown transformer learner option(s) {unknown}; valid: {sorted(names)}.")
        cfg = self.cfg = TransformerConfig(**config)
        if cfg.device == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            dev = cfg.device
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise OCLError(f"learner.device={cfg.device!r} but no CUDA device is available; use 'cpu' or 'auto'.")
        self.device = torch.device(dev)
        try:  # e.g. attn=triton on CPU: fail now, not mid-run
            check_backend(cfg.attn, self.device, training=True)
        except ValueError as e:  # the kernels are a library: the learner makes it the user's error
            raise OCLError(str(e)) from None
        if cfg.cuda_graph and cfg.dropout > 0:
            raise OCLError("learner.cuda_graph=true needs learner.dropout=0 (the captured step draws no random numbers).")
        if cfg.cuda_graph and self.device.type != "cuda":
            raise OCLError(f"learner.cuda_graph=true needs a CUDA device (learner.device={cfg.device!r} gives "
                           f"{self.device.type!r}); set learner.cuda_graph=false on CPU.")
        super().__init__(feature_dim, num_classes, seed)
        self.D, self.K, self.R = feature_dim, num_classes, cfg.replay_streams

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.model = OnlineTransformer(feature_dim, num_classes, cfg)
        self.model.to(self.device)
        if cfg.compile:  # in place: parameter names (checkpoints) stay those of the eager model
            self.model.compile(dynamic=False)
        self.gen = torch.Generator(self.device).manual_seed(seed)
        self.model.set_generator(self.gen)

        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "sink" not in name else no_decay).append(p)
        self.opt = FlatAdamW([(decay, cfg.weight_decay), (no_decay, 0.0)],
                             betas=(0.9, 0.99),  # beta2 0.99: moments that track a drifting stream
                             grad_clip=cfg.grad_clip)
        # Forward calibration: logits * exp(log_scale), fitted only on already-scored chunks.
        self.temperature = Temperature(cfg.temp_lr)

        tpe = self.model.tokens_per_example
        # G > 1: at a step, the segment's first query still needs the W examples before the segment,
        # while up to G - 1 of its examples are cached already (see _batch)
        self.cache = KVCache(cfg.n_layers, self.R, cfg.n_heads, (cfg.window + cfg.segment - 1) * tpe,
                             cfg.d_model // cfg.n_heads, device=self.device)
        self.history = History(feature_dim, device=self.device)
        self.cursors = ReplayCursors(self.R - 1, cfg.reset_rule, seed=seed)
        self.t = 0
        self.skipped_updates = 0
        self._rows_all = torch.arange(self.R, device=self.device)  # cache rows of the streams
        self._pending: _Pending | None = None
        self._segment: list[tuple[torch.Tensor, torch.Tensor]] = []  # G > 1: chunks revealed since the last step
        self.graphs = StepGraphs(self) if cfg.cuda_graph else None

    def set_workdir(self, path) -> None:
        """Keep the replay history (every revealed example) in ``path/replay_history.bin``:
        on disk, so memory stays flat on long streams and checkpoints need not copy it."""
        self.history.relocate(os.path.join(path, "replay_history.bin"))

    # ---------------------------------------------------------------- helpers
    def _check(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`check` the chunk where the caller keeps it (no device round trip), then move it
        to the learner's device."""
        self.check(x, y)
        return x.to(self.device, torch.float32), None if y is None else y.to(self.device)

    def _set_training(self, training: bool) -> None:
        # Module.train() walks every submodule: only when the mode changes and matters (dropout)
        if self.cfg.dropout > 0 and self.model.training != training:
            self.model.train(training)

    def _stream_forward(self, x, y, pos, rows, ctx_pos=None, **kw):
        """Model forward over the cached context of the selected streams (``rows``: slice);
        ``ctx_pos`` overrides the cache's slot positions (-1 masks a slot)."""
        ctx = [self.cache.read(layer, rows) for layer in range(self.cfg.n_layers)]
        if self.cfg.copy:
            kw["ctx_labels"] = self.cache.labels[rows]
        return self.model(x, y, pos, ctx, self.cache.positions(rows) if ctx_pos is None else ctx_pos, **kw)

    def _lr(self, t: int) -> float:
        """Learning rate when the chunk ending at example t is learned."""
        cfg, w = self.cfg, max(self.cfg.warmup, 1)
        if t < cfg.warmup:
            return cfg.lr * t / cfg.warmup
        return cfg.lr * math.sqrt(w / t) if cfg.lr_decay == "inv_sqrt" else cfg.lr

    def _scale(self) -> float:
        return self.temperature.scale if self.cfg.temperature else 1.0

    def shares_forward(self, C: int) -> bool:
        """Whether ``predict`` of a chunk of C examples runs the training forward itself.

        In kv mode with C = 1 every stream's chunk is a single token, and a token's label only
        enters its own key and value, which no query of the same forward attends to (a query
        never sees its own key). So labels change nothing the training forward computes but
        the keys/values it hands to the cache: ``predict`` can run it, without any label, and
        ``update`` adds the label terms before caching them (:meth:`_cache_entries`). The logits and
        gradients are those of a forward with labels (whose label-term gradients are exactly
        zero), and a forward per example is saved. Not with dropout (predict's forward would
        then be a training one), nor with ``cuda_graph`` (predict and the training step are
        captured separately: an autograd graph cannot span two CUDA graphs).
        """
        return (self.model.kv_mode and C == 1 and self.cfg.dropout == 0 and self.graphs is None
                and self.cfg.segment == 1)

    @torch.no_grad()
    def _raw_predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream 0's logits ``(C, K)`` for a chunk ``x (C, D)`` whose labels are unknown, and
        G > 1 the forward's keys/values ``(2, L, 1, H, T, Dh)`` (as they would be cached, labels aside)."""
        C = x.shape[0]
        pos = self.t + torch.arange(C, device=self.device)[None]  # (1, C)
        if self.graphs is not None:
            return self.graphs.predict(x[None], pos)
        return self._predict_forward(x[None], pos)

    def _predict_forward(self, x: torch.Tensor, pos: torch.Tensor,
                         y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (1, C, D)`` at positions ``pos (1, C)`` -> logits ``(C, K)`` and, G > 1 (where
        ``update`` caches them), stacked keys/values ``(2, L, 1, H, T, Dh)`` (else None), without
        gradient, over stream 0's cache; labels ``y (1, C)`` (None: unknown, as when predicting)."""
        self._set_training(False)
        if y is None and not (self.model.kv_mode and pos.shape[1] == 1):
            y = torch.full(pos.shape, self.K, device=self.device)  # this chunk's labels: unknown
        # (kv mode, one example: its label reaches only its own key/value, which it never sees; without
        # one they are the keys/values to which update adds the revealed label's terms)
        with torch.no_grad():
            logits, ks, vs, _ = self._stream_forward(x, y, pos, slice(0, 1), q_lo=self._q_lo(pos[:, :1], pos))
        if self.cfg.segment == 1:
            return logits[0], None
        return logits[0], torch.stack([*ks, *vs]).unflatten(0, (2, self.cfg.n_layers))

    def _q_lo(self, starts: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        """Lowest token position each query may attend to, ``(B, T)``: the W examples before its
        chunk (``starts (B, C)``: the first example of each example's chunk) and the chunk's
        earlier examples, for examples at ``pos (B, C)``. None while the cache holds W examples
        only (G = 1), which masks the same."""
        if self.cfg.segment == 1:
            return None
        tpe = self.model.tokens_per_example
        lo = (starts - self.cfg.window) * tpe  # (B, C)
        return lo.expand_as(pos).repeat_interleave(tpe, dim=1)

    def _batch(self, x: torch.Tensor, y: torch.Tensor | None, start: int | None = None,
               offsets: torch.Tensor | None = None) -> StepBatch:
        """Stream 0's chunk (G > 1: segment) ``x (C, D)``, ``y (C,)`` (None: labels not revealed
        yet) starting at example ``start`` (default: the next one), and the replay streams' next
        chunks (segments) of the same length. ``offsets (C,)``: where each example's chunk starts
        in the segment (G > 1). Changes no state: the replay plan is committed and the caches of
        streams that jump are emptied when the step is taken (:meth:`_finish`); until then
        their slots are masked, as are stream 0's slots of the segment itself (they are cached
        already, G > 1)."""
        C = x.shape[0]
        start = self.t if start is None else start
        ar = torch.arange(C, device=self.device)
        plan = self.cursors.plan(len(self.history), C)
        pos0 = start + ar[None]  # (1, C)
        y0 = (torch.full((C,), self.K, device=self.device) if y is None else y)[None]  # (1, C)
        ctx_pos = self.cache.positions(slice(None) if plan.active.any() else slice(0, 1))
        if start < self.t:  # G > 1: the segment's earlier chunks are in stream 0's cache already
            ctx_pos = ctx_pos.clone()
            ctx_pos[0].masked_fill_(ctx_pos[0] >= start * self.model.tokens_per_example, -1)
        offsets = ar if offsets is None else offsets
        if not plan.active.any():  # no history yet: stream 0 alone
            return StepBatch(plan, x[None], y0, pos0, ctx_pos, self._q_lo(start + offsets[None], pos0))
        hx, hy = self.history.chunks(plan.starts, C)  # (R-1, C, D), (R-1, C)
        hstart = torch.as_tensor(plan.starts, device=self.device)[:, None]  # (R-1, 1)
        if plan.reset.any():  # streams that jump start from an empty cache
            jumped = torch.as_tensor(np.concatenate([[False], plan.reset]), device=self.device)
            ctx_pos = ctx_pos.masked_fill(jumped[:, None], -1)
        pos = torch.cat([pos0, hstart + ar])  # (R, C)
        q_lo = self._q_lo(torch.cat([pos0[:, :1], hstart]) + offsets, pos)
        return StepBatch(plan, torch.cat([x[None], hx]), torch.cat([y0, hy]), pos, ctx_pos, q_lo)

    def _forward(self, batch: StepBatch, labelled: bool = True) -> _Forward:
        """The training forward of a batch; ``labelled=False``: no label enters it (only where
        :meth:`shares_forward`)."""
        self._set_training(True)
        rows = slice(0, batch.xs.shape[0])
        logits, ks, vs, tpos = self._stream_forward(batch.xs, batch.ys if labelled else None, batch.pos, rows,
                                                    batch.ctx_pos, q_lo=batch.q_lo)
        return _Forward(batch, labelled, logits, ks, vs, tpos)

    # ---------------------------------------------------------------- protocol
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        xd, _ = self._check(x)
        forward = kv = None
        if self.shares_forward(xd.shape[0]):
            with torch.enable_grad():
                forward = self._forward(self._batch(xd, None), labelled=False)
            logits = forward.logits[0].detach()  # stream 0: this chunk
        else:
            logits, kv = self._raw_predict(xd)
        self._pending = _Pending(x, logits, forward, kv)
        return F.log_softmax(logits * self._scale(), dim=1).to(x.device)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.opt is None:
            raise OCLError("transformer: a frozen() copy does not learn.")
        pending, self._pending = self._pending, None
        xd, yd = self._check(x, y)
        same = pending is not None and (pending.x is x or torch.equal(pending.x, x))
        if not same and (self.cfg.temperature or self.cfg.segment > 1):  # update without predict: score the
            logits, kv = self._raw_predict(xd)  # chunk as predict would have (and G > 1: its keys/values)
            pending = _Pending(x, logits, None, kv)
        if self.cfg.temperature:  # one step on the chunk just scored, using the logits it was scored with
            self.temperature.step(pending.logits, yd)
        if self.cfg.segment > 1:
            self._segment_update(xd, yd, pending.kv)
            return
        lr = self._lr(self.t + xd.shape[0])
        if same and pending.forward is not None:  # predict ran the training forward (labels not in it)
            fwd = pending.forward
            ys = torch.cat([yd[None], fwd.batch.ys[1:]])  # (B, C): stream 0's labels are revealed now
            kv = self._cache_entries(fwd, ys)  # before the step changes the label weights
            finite = self._train(fwd.logits, ys, lr)
            self.t += xd.shape[0]
            self._finish(fwd.batch, finite, kv, fwd.tpos, xd, yd)
            return
        batch = self._batch(xd, yd)
        if self.graphs is not None:
            finite, kv, tpos = self.graphs.train(batch, lr)
        else:
            finite, kv, tpos = self._train_step(batch.xs, batch.ys, batch.pos, batch.ctx_pos, lr)
        self.t += xd.shape[0]
        self._finish(batch, finite, kv, tpos, xd, yd)

    def _segment_update(self, x: torch.Tensor, y: torch.Tensor, kv: torch.Tensor | None) -> None:
        """G > 1: the revealed chunk ``x (C, D)``, ``y (C,)`` joins stream 0's cache, or, once G
        examples are revealed since the last step, the step over the segment takes place.
        ``kv (2, L, 1, H, T, Dh)``: predict's keys/values of the chunk (labels unknown)."""
        self._segment.append((x.clone(), y.clone()))  # the caller may reuse its buffers
        C, P = x.shape[0], sum(len(sy) for _, sy in self._segment)
        if P < self.cfg.segment:  # no step yet: the chunk's keys/values (labels in) enter the cache
            pos = self.t + torch.arange(C, device=self.device)[None]  # (1, C)
            if self.model.kv_mode and C == 1 and kv is not None:  # a lone token's label only enters its own
                kv = kv + self._label_kv_terms(y[None])  # key/value: predict's forward, plus the label terms
            else:
                kv = self._predict_forward(x[None], pos, y[None])[1]
            self.cache.write_stacked(self._rows_all[:1], self.model.token_positions(pos), kv,
                                     self.model.token_labels(y[None]))
            self.t += C
            return
        xs, ys = (torch.cat(parts) for parts in zip(*self._segment))  # (P, D), (P,)
        sizes = torch.tensor([len(sy) for _, sy in self._segment], device=self.device)
        self._segment = []
        offsets = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)  # (P,) chunk start in the segment
        batch = self._batch(xs, ys, start=self.t - (P - C), offsets=offsets)
        lr = self._lr(self.t + C)
        if self.graphs is not None:
            finite, kv, tpos = self.graphs.train(batch, lr)
        else:
            finite, kv, tpos = self._train_step(batch.xs, batch.ys, batch.pos, batch.ctx_pos, lr, batch.q_lo)
        self.t += C
        self._finish(batch, finite, kv, tpos, xs, ys)

    def _train_step(self, xs: torch.Tensor, ys: torch.Tensor, pos: torch.Tensor, ctx_pos: torch.Tensor,
                    lr: float | torch.Tensor, q_lo: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward (with labels), loss, backward and AdamW step of a batch, all on the device (what
        ``cuda_graph`` captures). Returns the finite flag, the cache entries and their positions."""
        fwd = self._forward(StepBatch(None, xs, ys, pos, ctx_pos, q_lo))
        kv = self._cache_entries(fwd, ys)
        return self._train(fwd.logits, ys, lr), kv, fwd.tpos

    def _train(self, logits: torch.Tensor, ys: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        """Loss of ``logits (B, C, K)`` on ``ys (B, C)``, backward, one clipped AdamW step at ``lr``;
        no step (decided on the device) when the loss is not finite. Returns that flag (0-dim)."""
        B, C = ys.shape
        if self.cfg.stream0_weight is None or B == 1:
            loss = F.cross_entropy(logits.reshape(-1, self.K), ys.reshape(-1))
        else:  # stream 0 (the newest chunk) weighs stream0_weight, the replay streams share the rest equally
            ce = F.cross_entropy(logits.reshape(-1, self.K), ys.reshape(-1), reduction="none").view(B, C)
            loss = (ce * stream_weights(B, C, self.cfg.stream0_weight, self.device)).sum()
        finite = torch.isfinite(loss)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step(lr, skip=~finite)
        return finite

    @torch.no_grad()
    def _cache_entries(self, fwd: _Forward, ys: torch.Tensor) -> torch.Tensor:
        """The forward's keys and values as the cache stores them, ``(2, L, B, H, T, Dh)``: with
        the label terms of ``ys`` added if the forward ran without labels."""
        kv = torch.stack([*fwd.ks, *fwd.vs]).unflatten(0, (2, self.cfg.n_layers))
        return kv if fwd.labelled else kv + self._label_kv_terms(ys)

    def _finish(self, batch: StepBatch, finite: torch.Tensor, kv: torch.Tensor, tpos: torch.Tensor, x: torch.Tensor,
                y: torch.Tensor) -> None:
        """After the step: the replay streams move on, the chunk's keys/values enter the caches
        and the chunk the history; after a non-finite loss (no step was taken) the chunk stays out
        of the history (replay would hit it again) and the caches, which may now hold non-finite
        K/V, are emptied."""
        self.cursors.commit(batch.plan)
        B = batch.xs.shape[0]
        if not bool(finite):
            self.skipped_updates += 1
            for b in range(B):
                self.cache.reset(b)
            return
        # Streams that jumped start afresh (the forward had their slots masked); only now, as the
        # fused kernels' backward reads the cache in place.
        for b in np.flatnonzero(batch.plan.reset):
            self.cache.reset(int(b) + 1)
        labels = self.model.token_labels(torch.cat([y[None], batch.ys[1:]]))  # (B, T): stream 0's revealed now
        self.cache.write_stacked(self._rows_all[:B], tpos, kv, labels)
        self.history.append(x, y)

    @torch.no_grad()
    def _label_kv_terms(self, ys: torch.Tensor) -> torch.Tensor:
        """What labels ``ys (B, C)`` add to keys and values in kv mode, ``(2, L, B, H, C, Dh)``.

        A label-free forward (:meth:`shares_forward`) hands the cache keys/values without
        them. (The label weights get no gradient from such a forward where they would get an
        exactly zero one from a forward with labels; :class:`FlatAdamW` treats both the same.)
        """
        B, C = ys.shape
        cfg = self.cfg
        lab = self.model.label_kv(self.model.label_emb(ys))  # (B, C, L * 2 * d): per layer [key | value]
        return lab.view(B, C, cfg.n_layers, 2, cfg.n_heads, -1).permute(3, 2, 0, 4, 1, 5)
