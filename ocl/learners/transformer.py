"""Transformer learner for supervised online continual learning.

Bornschein, Li, Rannen-Triki, *Transformers for Supervised Online Continual Learning*
(arXiv 2403.01554, 2024): a transformer over the stream of examples that learns in
context (it attends to the last W revealed examples and their labels) and in weights
(one online AdamW step per chunk, Transformer-XL style, with R replay streams).

Tokens come from frozen feature vectors (input LayerNorm + Linear). Two ways to give the
model the labels of past examples (``label_mode``):

- ``"kv"`` (pi-transformer, "privileged information"): one token per example. In every
  layer the key and value of an example's token are a projection of its normalised hidden
  state **plus** a projection of its label embedding; its query and residual stream never
  see a label. The mask is strictly causal (zero diagonal), so a query never meets its own
  label. A learned per-layer "sink" key/value is always attendable, so the very first
  example (empty context) has something to attend to.
- ``"context"`` (2-token): the sequence interleaves an x-token and a y-token (the label
  embedding) per example; causal attention including the diagonal; the loss is taken at
  x-tokens only, and an x-token never sees its own y-token (it comes right after it).

Labels not yet revealed (the chunk being predicted) use an extra "unknown" label, index K
(zero-initialised: it adds nothing to keys/values in kv mode). ``predict`` builds the
chunk's tokens with the unknown label; ``update`` uses the true labels (teacher forcing,
as in Transformer-XL training). With C = 1 the two are identical (an example's own label
is masked from its own query anyway). With C > 1 they differ: in ``update`` example i of
a chunk sees the true labels of examples j < i of the same chunk, in ``predict`` it sees
"unknown" there, a label the default update never trains. So C > 1 trades some accuracy
inside each chunk for throughput; the cached past always carries true labels.

Memory (Transformer-XL): each chunk attends causally to itself and to the cached,
detached keys/values of the last W examples before it (:mod:`ocl.learners.kv_cache`), so
a query late in a chunk sees up to W + C - 1 earlier examples (W = 0: only its own chunk).
Results do not depend on the ring's slot order or wrap-around: incremental processing equals
one cache-free forward with the matching block-banded mask (``q_lo``, used by the tests).
Positions are relative: ALiBi biases ``-slope_h * distance_in_examples``, so any stream
length works. Replay (:mod:`ocl.learners.replay`): stream 0 is the newest chunk; streams
1..R-1 walk over the revealed history with their own caches; one forward and one AdamW
step per chunk cover all streams at once (the batch dimension is the stream). A chunk whose
loss is not finite is skipped (counted in ``skipped_updates``) and kept out of the history.

Cost of a step (one chunk): one training forward over the R streams, one backward, one
AdamW step over all parameters kept in flat buffers (:mod:`ocl.learners.flat_adamw`: one
norm for clipping, one fused kernel per group), and, when C > 1 or in context mode, a
gradient-free forward of stream 0 for ``predict``. With C = 1 in kv mode ``predict`` runs
the training forward itself and ``update`` reuses it: labels cannot change what it computes
(see :meth:`TransformerLearner.shares_forward`). On a GPU, ``cuda_graph`` replays predict and
the whole training step as captured CUDA graphs (:mod:`ocl.learners.cuda_graphs`).

CPU note: the per-example loop runs many tiny kernels; intra-op threads only add overhead
(on a busy 2-core machine ``torch.set_num_threads(1)`` was 10x faster than 2 threads).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.kernels import BACKENDS, check_backend, resolve_backend, windowed_attention
from ocl.kernels.reference import attention_bias
from ocl.learners.base import Learner
from ocl.learners.cuda_graphs import StepGraphs
from ocl.learners.flat_adamw import FlatAdamW
from ocl.learners.kv_cache import KVCache
from ocl.learners.replay import History, ReplayCursors, ReplayPlan


@dataclass
class TransformerConfig:
    label_mode: str = "kv"  # "kv": one token per example, the paper's best and 2x fewer tokens; "context": 2-token
    d_model: int = 128  # width; digits: 64 about as good and 1.3x faster on CPU, 128 safer for rich features
    n_layers: int = 2  # two layers give a "look up similar x, copy its y" path; 4 was worse on digits
    n_heads: int = 4  # 4 ALiBi slopes: from very local (1/4 per example) to nearly flat over W
    mlp_ratio: int = 4  # standard transformer MLP expansion
    dropout: float = 0.0  # online learning sees each example once per stream: no overfitting to fight early
    window: int = 64  # W examples of cached context; the paper gains up to ~512 on CLOC, 64 suits small streams
    replay_streams: int = 8  # R (incl. stream 0); paper: 1 far worse than >= 4; digits: 8 > 4 >> 1
    lr: float = 3e-3  # AdamW peak lr; sweep {1e-3,3e-3,1e-2} x decay x R on digits/EMNIST, split+iid: best mean
    warmup: int = 100  # examples of linear warm-up (Adam's second moments are noisy at first)
    lr_decay: str = "constant"  # | "inv_sqrt": lr*sqrt(warmup/t), the paper's best on 39M examples; decays too early on short streams
    weight_decay: float = 0.01  # mild AdamW decay on matrices, keeps the net plastic on long streams
    grad_clip: float = 1.0  # single-example steps are noisy; clip the global gradient norm
    reset_rule: str = "start"  # cursors jump w.p. C/t back to 0 (uniform replay) | "prob": random point (recent-heavy)
    temperature: bool = True  # learned output temperature, updated after each chunk is scored (log-loss)
    temp_lr: float = 0.01  # Adam step size on the log-temperature (one step per chunk)
    device: str = "cpu"  # "cpu" | "cuda" | "auto" (cuda when available)
    attn: str = "torch"  # "torch" (concat + SDPA) | "triton" (fused kernels, CUDA) | "flex" | "auto": triton on CUDA, else torch
    compile: bool = False  # torch.compile the network (static cache shapes); CPU: +5-9% ex/s for ~45 s of compiling
    cuda_graph: bool = False  # CUDA: replay predict and the training step as captured CUDA graphs (needs dropout 0)
    eval_batch: int = 256  # held-out examples per evaluate() forward

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> OCLError:
            return OCLError(f"learner.{key}={getattr(self, key)!r}: {why}")

        if self.label_mode not in ("kv", "context"):
            raise bad("label_mode", "must be 'kv' or 'context'.")
        if self.lr_decay not in ("constant", "inv_sqrt"):
            raise bad("lr_decay", "must be 'constant' or 'inv_sqrt'.")
        if self.reset_rule not in ("prob", "start"):
            raise bad("reset_rule", "must be 'prob' or 'start'.")
        if self.attn not in BACKENDS:
            raise bad("attn", f"must be one of {BACKENDS}.")
        if self.d_model % self.n_heads:
            raise bad("d_model", f"must be divisible by n_heads={self.n_heads}.")
        for key in ("d_model", "n_layers", "n_heads", "mlp_ratio", "replay_streams", "eval_batch"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1.")
        for key in ("window", "warmup", "lr", "weight_decay", "grad_clip", "temp_lr"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0.")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1).")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention with an additive bias (the one place to swap backends).

    Args:
        q: ``(B, H, T, Dh)``; k, v: ``(B, H, Tk, Dh)``.
        bias: ``(B, H, T, Tk)`` float, ``-inf`` where masked; every row has a finite entry.
    Returns:
        ``(B, H, T, Dh)``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class FusedMask(NamedTuple):
    """What the fused backends (:func:`ocl.kernels.windowed_attention`) need instead of a bias
    tensor: positions and flags, from which they build the mask and ALiBi bias tile by tile."""

    tpos: torch.Tensor  # (B, T) token positions of the chunk
    ctx_pos: torch.Tensor  # (B, S) token positions of the cache slots, -1 = empty
    slopes: torch.Tensor  # (H,)
    strict: bool  # kv mode: a query never sees its own key (nor its own label)
    isolated: bool
    q_lo: torch.Tensor | None  # (B, T) or None
    backend: str  # "triton" | "flex"


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes ``2^(-8 h / H)``, h = 1..H (Press et al. 2022), ``(H,)``."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])


class Dropout(nn.Module):
    """Dropout drawing from the learner's own generator, so runs are seeded and repeatable."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.gen: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.gen)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-LN transformer block whose keys/values may carry a label term (kv mode)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d, self.n_heads = cfg.d_model, cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc_out = nn.Linear(cfg.mlp_ratio * d, d)
        self.drop = Dropout(cfg.dropout)
        # The attention sink: a learned key/value every query can always attend to.
        self.sink_kv = nn.Parameter(torch.randn(2, cfg.n_heads, 1, d // cfg.n_heads) * 0.02)  # (2, H, 1, Dh)

    def forward(
        self,
        h: torch.Tensor,  # (B, T, d) residual stream
        lab: torch.Tensor | None,  # (B, T, 2d) label terms of keys | values, or None
        ctx_k: torch.Tensor,  # (B, H, S, Dh) cached keys
        ctx_v: torch.Tensor,  # (B, H, S, Dh) cached values
        bias: torch.Tensor | FusedMask,  # (B, H, T, 1+S+T) additive bias (torch backend), or positions
        trace: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, d = h.shape
        H = self.n_heads
        q, kv = self.qkv(self.ln1(h)).split([d, 2 * d], dim=2)  # (B, T, d), (B, T, 2d)
        q = q.view(B, T, H, d // H).transpose(1, 2)  # (B, H, T, Dh)
        fused = isinstance(bias, FusedMask)
        if lab is not None and not fused:  # label enters keys and values only; q and h never see it
            kv = kv + lab
        k, v = split_heads(kv, H)  # each (B, H, T, Dh)
        if fused:
            lab_k, lab_v = split_heads(lab, H) if lab is not None else (None, None)  # the kernel adds them
            a = windowed_attention(q, k, v, lab_k, lab_v, ctx_k, ctx_v, bias.ctx_pos, bias.tpos,
                                   self.sink_kv[0, :, 0], self.sink_kv[1, :, 0], bias.slopes, bias.strict,
                                   isolated=bias.isolated, q_lo=bias.q_lo, backend=bias.backend)
            if lab_k is not None:  # the keys/values the cache stores (it detaches them anyway)
                k, v = (k + lab_k).detach(), (v + lab_v).detach()
        else:
            sink_k, sink_v = self.sink_kv[:, None].expand(-1, B, -1, -1, -1).unbind(0)  # each (B, H, 1, Dh)
            keys = torch.cat([sink_k, ctx_k, k], dim=2)  # (B, H, 1+S+T, Dh)
            vals = torch.cat([sink_v, ctx_v, v], dim=2)  # (B, H, 1+S+T, Dh)
            a = attention(q, keys, vals, bias)  # (B, H, T, Dh)
        if trace is not None:
            trace.append({"h": h, "q": q, "k": k, "v": v})
        a = a.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        h = h + self.drop(self.proj(a))
        h = h + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(h)))))
        return h, k, v


def split_heads(kv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, 2d)`` keys | values (or their label terms) -> two ``(B, H, T, Dh)`` views."""
    B, T, two_d = kv.shape
    return kv.view(B, T, 2, n_heads, two_d // (2 * n_heads)).permute(2, 0, 3, 1, 4).unbind(0)


class OnlineTransformer(nn.Module):
    """The network: feature tokens (+ label tokens or label K/V terms), blocks, class head."""

    def __init__(self, feature_dim: int, num_classes: int, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        d, L = cfg.d_model, cfg.n_layers
        self.kv_mode = cfg.label_mode == "kv"
        self.tokens_per_example = 1 if self.kv_mode else 2
        self.in_ln = nn.LayerNorm(feature_dim)
        self.in_proj = nn.Linear(feature_dim, d)
        self.label_emb = nn.Embedding(num_classes + 1, d)  # index K = "unknown" (not yet revealed)
        if self.kv_mode:  # one projection for all layers' key and value label terms
            self.label_kv = nn.Linear(d, L * 2 * d, bias=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(L))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        # ALiBi slope per head, per *token* so distances count in examples in both modes.
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads) / self.tokens_per_example, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias") and p.dim() == 1 and "ln" not in name:
                nn.init.zeros_(p)
            elif p.dim() == 2 and "ln" not in name:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, std=std)
        nn.init.normal_(self.in_proj.weight, std=0.02)
        nn.init.normal_(self.label_emb.weight, std=1.0)  # unit scale like a LayerNorm output
        with torch.no_grad():
            self.label_emb.weight[self.num_classes].zero_()  # "unknown": no label information
        nn.init.zeros_(self.head.weight)  # first predictions uniform: log-loss log K, the honest prior
        nn.init.zeros_(self.head.bias)

    def set_generator(self, gen: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, Dropout):
                m.gen = gen

    def label_terms(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """kv mode: what labels ``y (B, C)`` add to keys | values, per layer ``(B, C, 2d)``."""
        B, C = y.shape
        L, d = self.cfg.n_layers, self.cfg.d_model
        return self.label_kv(self.label_emb(y)).view(B, C, L, 2 * d).unbind(2)

    def attn_bias(
        self,
        tpos: torch.Tensor,  # (B, T) token positions of the chunk
        ctx_pos: torch.Tensor,  # (B, S) token positions of cached slots, -1 = empty
        isolated: bool = False,
        q_lo: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Additive attention bias ``(B, H, T, 1+S+T)`` over [sink, cache, chunk] keys.

        A key is attendable when it is valid, causal (strictly in kv mode) and, if
        ``isolated``, only the query itself within the chunk (held-out evaluation). ``q_lo``
        ``(B, T)`` optionally bounds each query's lowest attendable token position (used by
        the full-recomputation reference, which has no cache).
        """
        return attention_bias(ctx_pos, tpos, self.slopes, self.kv_mode, isolated, q_lo, dtype=self.slopes.dtype)

    def forward(
        self,
        x: torch.Tensor,  # (B, C, D) features
        y: torch.Tensor | None,  # (B, C) labels, K = unknown; unused when isolated; kv mode: None = no label terms
        pos: torch.Tensor,  # (B, C) example positions in each stream
        ctx: list[tuple[torch.Tensor, torch.Tensor]] | None = None,  # per layer (B, H, S, Dh) x2
        ctx_pos: torch.Tensor | None = None,  # (B, S)
        *,
        isolated: bool = False,
        q_lo: torch.Tensor | None = None,  # (B, T) token-position lower bound per query
        trace: list | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Returns logits ``(B, C, K)``, per-layer chunk keys and values ``(B, H, T, Dh)`` and
        the chunk's token positions ``(B, T)`` (T = C, or 2C in context mode)."""
        B, C, _ = x.shape
        d, L, H = self.cfg.d_model, self.cfg.n_layers, self.cfg.n_heads
        h = self.in_proj(self.in_ln(x))  # (B, C, d)
        labs = [None] * L
        if self.kv_mode:
            tpos = pos
            if y is not None and not isolated:  # isolated queries never see their own keys: no label needed
                labs = self.label_terms(y)
        elif isolated:
            tpos = 2 * pos  # x-tokens only
        else:
            hy = self.label_emb(y)  # (B, C, d)
            h = torch.stack([h, hy], dim=2).view(B, 2 * C, d)  # (B, 2C, d): x1 y1 x2 y2 ...
            tpos = (2 * pos[:, :, None] + torch.arange(2, device=pos.device)).view(B, 2 * C)
        if ctx is None:
            empty = h.new_zeros(B, H, 0, d // H)
            ctx, ctx_pos = [(empty, empty)] * L, tpos.new_zeros(B, 0)
        backend = resolve_backend(self.cfg.attn, x.device)
        if backend == "torch":  # one bias tensor, shared by all layers
            bias = self.attn_bias(tpos, ctx_pos, isolated, q_lo)  # (B, H, T, 1+S+T)
        else:  # fused kernels build mask and bias from positions, tile by tile
            bias = FusedMask(tpos, ctx_pos, self.slopes, self.kv_mode, isolated, q_lo, backend)
        ks, vs = [], []
        for block, lab, (ctx_k, ctx_v) in zip(self.blocks, labs, ctx):
            h, k, v = block(h, lab, ctx_k, ctx_v, bias, trace)
            ks.append(k)
            vs.append(v)
        if not self.kv_mode and not isolated:
            h = h[:, 0::2]  # predictions are read at x-tokens
        logits = self.head(self.ln_f(h))  # (B, C, K)
        return logits, ks, vs, tpos


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


class _Batch(NamedTuple):
    """The inputs of one training forward: stream 0 (the new chunk) and, once there is history,
    the R-1 replay streams' chunks (B = 1 or R; stream b is cache row b)."""

    plan: ReplayPlan  # the replay streams' chunks (committed when the step is taken)
    xs: torch.Tensor  # (B, C, D)
    ys: torch.Tensor  # (B, C) labels; stream 0's are "unknown" (K) until they are revealed
    pos: torch.Tensor  # (B, C) example positions in each stream
    ctx_pos: torch.Tensor  # (B, S) token positions of the streams' cache slots; -1: empty, or the stream jumps


class _Forward(NamedTuple):
    """A training forward over a batch, by ``predict`` or ``update``."""

    batch: _Batch
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


class TransformerLearner(Learner):
    """Online transformer learner (in-context + in-weights), see the module docstring.

    One step (``predict`` then ``update`` of a chunk) is one training forward over all R
    streams, one backward and one AdamW step. With C = 1 in kv mode the forward runs in
    ``predict`` and ``update`` reuses it (:meth:`shares_forward`); otherwise ``predict`` runs
    its own gradient-free forward of stream 0 with the chunk's labels "unknown".

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
        check_backend(cfg.attn, self.device, training=True)  # e.g. attn=triton on CPU: fail now, not mid-run
        if cfg.cuda_graph and cfg.dropout > 0:
            raise OCLError("learner.cuda_graph=true needs learner.dropout=0 (the captured step draws no random numbers).")
        if cfg.cuda_graph and self.device.type != "cuda":
            raise OCLError(f"learner.cuda_graph=true needs a CUDA device (learner.device={cfg.device!r} gives "
                           f"{self.device.type!r}); set learner.cuda_graph=false on CPU.")
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
        self.cache = KVCache(cfg.n_layers, self.R, cfg.n_heads, cfg.window * tpe, cfg.d_model // cfg.n_heads,
                             device=self.device)
        self.history = History(feature_dim, device=self.device)
        self.cursors = ReplayCursors(self.R - 1, cfg.reset_rule, seed=seed)
        self.t = 0
        self.skipped_updates = 0
        self._rows_all = torch.arange(self.R, device=self.device)  # cache rows of the streams
        self._pending: _Pending | None = None
        self.graphs = StepGraphs(self) if cfg.cuda_graph else None

    def set_workdir(self, path) -> None:
        """Keep the replay history (every revealed example) in ``path/replay_history.bin``:
        on disk, so memory stays flat on long streams and checkpoints need not copy it."""
        self.history.relocate(os.path.join(path, "replay_history.bin"))

    # ---------------------------------------------------------------- helpers
    def _check(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.dim() != 2 or x.shape[1] != self.D:
            raise OCLError(f"transformer learner expects features of shape (C, {self.D}); got {tuple(x.shape)}.")
        if y is not None:  # checked where the caller keeps them: no device round trip
            if y.shape != (x.shape[0],):
                raise OCLError(f"labels must have shape ({x.shape[0]},); got {tuple(y.shape)}.")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.K):
                raise OCLError(f"labels must lie in [0, {self.K}); got range [{int(y.min())}, {int(y.max())}].")
            y = y.to(self.device, torch.long)
        return x.to(self.device, torch.float32), y

    def _set_training(self, training: bool) -> None:
        if self.model.training != training:  # Module.train() walks every submodule: only when it changes
            self.model.train(training)

    def _stream_forward(self, x, y, pos, rows, ctx_pos=None, **kw):
        """Model forward over the cached context of the selected streams (``rows``: slice);
        ``ctx_pos`` overrides the cache's slot positions (-1 masks a slot)."""
        ctx = [self.cache.read(layer, rows) for layer in range(self.cfg.n_layers)]
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
        return self.model.kv_mode and C == 1 and self.cfg.dropout == 0 and self.graphs is None

    @torch.no_grad()
    def _raw_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Stream 0's logits ``(C, K)`` for a chunk ``x (C, D)`` whose labels are unknown."""
        C = x.shape[0]
        pos = self.t + torch.arange(C, device=self.device)[None]  # (1, C)
        if self.graphs is not None:
            return self.graphs.predict(x[None], pos)
        return self._predict_forward(x[None], pos)

    def _predict_forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``x (1, C, D)`` at positions ``pos (1, C)`` -> logits ``(C, K)`` (no gradient)."""
        self._set_training(False)
        y = torch.full(pos.shape, self.K, device=self.device)  # this chunk's labels: unknown
        with torch.no_grad():
            return self._stream_forward(x, y, pos, slice(0, 1))[0][0]

    def _batch(self, x: torch.Tensor, y: torch.Tensor | None) -> _Batch:
        """Stream 0's chunk ``x (C, D)``, ``y (C,)`` (None: labels not revealed yet) and the replay
        streams' next chunks. Changes no state: the replay plan is committed and the caches of
        streams that jump are emptied when the step is taken (:meth:`_finish`); until then
        their slots are masked."""
        C = x.shape[0]
        plan = self.cursors.plan(len(self.history), C)
        pos0 = self.t + torch.arange(C, device=self.device)[None]  # (1, C)
        y0 = (torch.full((C,), self.K, device=self.device) if y is None else y)[None]  # (1, C)
        if not plan.active.any():  # no history yet: stream 0 alone
            return _Batch(plan, x[None], y0, pos0, self.cache.positions(slice(0, 1)))
        hx, hy = self.history.chunks(plan.starts, C)  # (R-1, C, D), (R-1, C)
        hpos = torch.as_tensor(plan.starts, device=self.device)[:, None] + torch.arange(C, device=self.device)
        ctx_pos = self.cache.positions(slice(None))
        if plan.reset.any():  # streams that jump start from an empty cache
            jumped = torch.as_tensor(np.concatenate([[False], plan.reset]), device=self.device)
            ctx_pos = ctx_pos.masked_fill(jumped[:, None], -1)
        return _Batch(plan, torch.cat([x[None], hx]), torch.cat([y0, hy]), torch.cat([pos0, hpos]), ctx_pos)

    def _forward(self, batch: _Batch, labelled: bool = True) -> _Forward:
        """The training forward of a batch; ``labelled=False``: no label enters it (only where
        :meth:`shares_forward`)."""
        self._set_training(True)
        rows = slice(0, batch.xs.shape[0])
        logits, ks, vs, tpos = self._stream_forward(batch.xs, batch.ys if labelled else None, batch.pos, rows,
                                                    batch.ctx_pos)
        return _Forward(batch, labelled, logits, ks, vs, tpos)

    # ---------------------------------------------------------------- protocol
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        xd, _ = self._check(x)
        forward = None
        if self.shares_forward(xd.shape[0]):
            with torch.enable_grad():
                forward = self._forward(self._batch(xd, None), labelled=False)
            logits = forward.logits[0].detach()  # stream 0: this chunk
        else:
            logits = self._raw_predict(xd)
        self._pending = _Pending(x, logits, forward)
        return F.log_softmax(logits * self._scale(), dim=1).to(x.device)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        xd, yd = self._check(x, y)
        same = pending is not None and (pending.x is x or torch.equal(pending.x, x))
        if self.cfg.temperature:  # one step on the chunk just scored, using the logits it was scored with
            self.temperature.step(pending.logits if same else self._raw_predict(xd), yd)
        lr = self._lr(self.t + xd.shape[0])
        if same and pending.forward is not None:  # predict ran the training forward (labels not in it)
            fwd = pending.forward
            ys = torch.cat([yd[None], fwd.batch.ys[1:]])  # (B, C): stream 0's labels are revealed now
            kv = self._cache_entries(fwd, ys)  # before the step changes the label weights
            finite = self._train(fwd.logits, ys, lr)
            self._finish(fwd.batch, finite, kv, fwd.tpos, xd, yd)
            return
        batch = self._batch(xd, yd)
        if self.graphs is not None:
            finite, kv, tpos = self.graphs.train(batch, lr)
        else:
            finite, kv, tpos = self._train_step(batch.xs, batch.ys, batch.pos, batch.ctx_pos, lr)
        self._finish(batch, finite, kv, tpos, xd, yd)

    def _train_step(self, xs: torch.Tensor, ys: torch.Tensor, pos: torch.Tensor, ctx_pos: torch.Tensor,
                    lr: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward (with labels), loss, backward and AdamW step of a batch, all on the device (what
        ``cuda_graph`` captures). Returns the finite flag, the cache entries and their positions."""
        fwd = self._forward(_Batch(None, xs, ys, pos, ctx_pos))
        kv = self._cache_entries(fwd, ys)
        return self._train(fwd.logits, ys, lr), kv, fwd.tpos

    def _train(self, logits: torch.Tensor, ys: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        """Loss of ``logits (B, C, K)`` on ``ys (B, C)``, backward, one clipped AdamW step at ``lr``;
        no step (decided on the device) when the loss is not finite. Returns that flag (0-dim)."""
        loss = F.cross_entropy(logits.reshape(-1, self.K), ys.reshape(-1))
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

    def _finish(self, batch: _Batch, finite: torch.Tensor, kv: torch.Tensor, tpos: torch.Tensor, x: torch.Tensor,
                y: torch.Tensor) -> None:
        """After the step: the replay streams move on, the chunk's keys/values enter the caches
        and the chunk the history; after a non-finite loss (no step was taken) the chunk stays out
        of the history (replay would hit it again) and the caches, which may now hold non-finite
        K/V, are emptied."""
        self.cursors.commit(batch.plan)
        self.t += x.shape[0]
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
        self.cache.write_stacked(self._rows_all[:B], tpos, kv)
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

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Held-out log-probs ``(N, K)``: each example attends to stream 0's current cache as
        if it were the next example, independently of the others; no cache is modified."""
        xd, _ = self._check(x)
        self._set_training(False)
        out = []
        for s in range(0, xd.shape[0], self.cfg.eval_batch):
            xb = xd[s : s + self.cfg.eval_batch][None]  # (1, N', D)
            pos = torch.full(xb.shape[:2], self.t, device=self.device)  # (1, N')
            logits = self._stream_forward(xb, None, pos, slice(0, 1), isolated=True)[0][0]
            out.append(F.log_softmax(logits * self._scale(), dim=1))
        if not out:
            return torch.zeros(0, self.K)
        return torch.cat(out).to(x.device)
