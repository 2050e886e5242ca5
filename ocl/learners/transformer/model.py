"""The network of the transformer learner: feature tokens (+ label tokens, or label terms in
keys and values), pre-LN blocks with windowed ALiBi attention over a KV cache, a class head.

:class:`TransformerConfig` holds every option of the learner (the network's, the training's
and the runtime's); :class:`OnlineTransformer` is the ``nn.Module``. See the package docstring
(:mod:`ocl.learners.transformer`) for the method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.kernels import BACKENDS, resolve_backend, windowed_attention
from ocl.kernels.reference import attention_bias, sdpa_attention


@dataclass
class TransformerConfig:
    label_mode: str = "kv"  # "kv": one token per example, the paper's best and 2x fewer tokens; "context": 2-token
    d_model: int = 128  # width; digits: 64 about as good and 1.3x faster on CPU, 128 safer for rich features
    n_layers: int = 2  # two layers give a "look up similar x, copy its y" path; 4 was worse on digits
    n_heads: int = 4  # 4 ALiBi slopes: from very local (1/4 per example) to nearly flat over W
    mlp_ratio: int = 4  # standard transformer MLP expansion
    dropout: float = 0.0  # online learning sees each example once per stream: no overfitting to fight early
    window: int = 64  # W examples of cached context; the paper gains up to ~512 on CLOC, 64 suits small streams
    replay_streams: int = 4  # R (incl. stream 0); paper: 1 far worse than >= 4; with copy, 4 beat 8 on 3 of 5 streams
    segment: int = 1  # G: one gradient step per G revealed examples, over Transformer-XL segments of G per stream
    copy: bool = True  # mix a copy of the labels the last layer attends to into the prediction (permuted +14)
    copy_recency: bool = True  # copy: learn a per-head scale of its ALiBi slopes (how strongly it favours recent labels)
    lr: float = 1e-3  # AdamW peak lr; on pretrained features 1e-3 beat 3e-3 and 1e-2 (README, "The transformer learner")
    warmup: int = 100  # examples of linear warm-up (Adam's second moments are noisy at first)
    lr_decay: str = "constant"  # | "inv_sqrt": lr*sqrt(warmup/t), the paper's best on 39M examples; decays too early on short streams
    weight_decay: float = 0.01  # mild AdamW decay on matrices, keeps the net plastic on long streams
    grad_clip: float = 1.0  # single-example steps are noisy; clip the global gradient norm
    reset_rule: str = "prob"  # cursors jump w.p. C/t to a random past point (recent-heavy: +2.4 on permuted) | "start": back to 0 (uniform)
    temperature: bool = True  # learned output temperature, updated after each chunk is scored (log-loss)
    temp_lr: float = 0.01  # Adam step size on the log-temperature (one step per chunk)
    device: str = "cpu"  # "cpu" | "cuda" | "auto" (cuda when available)
    attn: str = "torch"  # "torch" (concat + SDPA) | "triton" (fused kernels, CUDA) | "flex" | "auto": triton on CUDA, else torch
    compile: bool = False  # torch.compile the network (static cache shapes); CPU: +5-9% ex/s for ~45 s of compiling
    cuda_graph: bool = False  # CUDA: replay predict and the training step as captured CUDA graphs (needs dropout 0)
    eval_batch: int = 256  # held-out examples per evaluate() forward
    eval_context: str = "stream0"  # what held-out examples attend to: stream0's cache | replay: each replay cache, averaged | none
    stream0_weight: float | None = 0.5  # loss weight of stream 0 (the newest chunk); replay shares the rest; None: 1/B each (+1.6 permuted)
    qk_init: float = 0.0  # > 0: each layer's query and key weights start equal, N(0, qk_init^2): attention (and the copy) a similarity look-up from step 0
    qk_init_layers: str = "all"  # which layers qk_init ties: "all" | "first" | "last" (the copy read-out's)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> OCLError:
            return OCLError(f"learner.{key}={getattr(self, key)!r}: {why}")

        if self.label_mode not in ("kv", "context"):
            raise bad("label_mode", "must be 'kv' or 'context'.")
        if self.lr_decay not in ("constant", "inv_sqrt"):
            raise bad("lr_decay", "must be 'constant' or 'inv_sqrt'.")
        if self.eval_context not in ("stream0", "replay", "none"):
            raise bad("eval_context", "must be 'stream0', 'replay' or 'none'.")
        if self.qk_init_layers not in ("all", "first", "last"):
            raise bad("qk_init_layers", "must be 'all', 'first' or 'last'.")
        if self.reset_rule not in ("prob", "start"):
            raise bad("reset_rule", "must be 'prob' or 'start'.")
        if self.attn not in BACKENDS:
            raise bad("attn", f"must be one of {BACKENDS}.")
        if self.d_model % self.n_heads:
            raise bad("d_model", f"must be divisible by n_heads={self.n_heads}.")
        for key in ("d_model", "n_layers", "n_heads", "mlp_ratio", "replay_streams", "segment", "eval_batch"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1.")
        for key in ("window", "warmup", "lr", "weight_decay", "grad_clip", "temp_lr", "qk_init"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0.")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1).")
        if self.stream0_weight is not None and not 0 < self.stream0_weight <= 1:
            raise bad("stream0_weight", "must be in (0, 1] or null.")


class AttentionMask(NamedTuple):
    """Which keys the queries of one forward may attend to, shared by all its layers: the
    positions and flags every backend of :func:`ocl.kernels.windowed_attention` builds its
    mask and ALiBi bias from, and for the ``torch`` backend that bias itself, built once per
    forward instead of once per layer."""

    tpos: torch.Tensor  # (B, T) token positions of the chunk
    ctx_pos: torch.Tensor  # (B, S) token positions of the cache slots, -1 = empty
    slopes: torch.Tensor  # (H,)
    strict: bool  # kv mode: a query never sees its own key (nor its own label)
    isolated: bool
    q_lo: torch.Tensor | None  # (B, T) or None
    backend: str  # "torch" | "triton" | "flex"
    bias: torch.Tensor | None  # (B, H, T, 1+S+T) for the torch backend, else None


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
        self.sink_kv = nn.Parameter(torch.randn(2, cfg.n_heads, d // cfg.n_heads) * 0.02)  # (2, H, Dh)

    def forward(
        self,
        h: torch.Tensor,  # (B, T, d) residual stream
        lab: torch.Tensor | None,  # (B, T, 2d) label terms of keys | values, or None
        ctx_k: torch.Tensor,  # (B, H, S, Dh) cached keys
        ctx_v: torch.Tensor,  # (B, H, S, Dh) cached values
        mask: AttentionMask,  # which keys each query sees (shared by the layers of a forward)
        trace: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the new residual stream, the chunk's keys and values as the cache stores them
        (detached, label terms in) and its queries and keys as attention used them ``(B, H, T, Dh)``."""
        B, T, d = h.shape
        H = self.n_heads
        q, kv = self.qkv(self.ln1(h)).split([d, 2 * d], dim=2)  # (B, T, d), (B, T, 2d)
        q = q.view(B, T, H, d // H).transpose(1, 2)  # (B, H, T, Dh)
        k, v = split_heads(kv, H)  # each (B, H, T, Dh), without the label
        lab_k, lab_v = split_heads(lab, H) if lab is not None else (None, None)  # kv mode: the label terms
        # the label enters keys and values only (the op adds it); q and h never see it
        sink_k, sink_v = self.sink_kv.unbind(0)  # each (H, Dh)
        a = windowed_attention(q, k, v, lab_k, lab_v, ctx_k, ctx_v, mask.ctx_pos, mask.tpos, sink_k, sink_v,
                               mask.slopes, mask.strict, isolated=mask.isolated, q_lo=mask.q_lo, backend=mask.backend,
                               bias=mask.bias)  # (B, H, T, Dh)
        qk = (q, k if lab_k is None else k + lab_k)  # for the copy read-out (attached: keys learn through it)
        if lab_k is not None:  # the keys/values the cache stores (it detaches them anyway)
            k, v = (k + lab_k).detach(), (v + lab_v).detach()
        if trace is not None:
            trace.append({"h": h, "q": q, "k": k, "v": v})
        a = a.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        h = h + self.drop(self.proj(a))
        h = h + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(h)))))
        return h, k, v, qk


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
        if cfg.copy:  # the copy read-out's weight (sigmoid(0) = 1/2 at first) and its heads' (equal at first)
            self.copy_gate = nn.Parameter(torch.zeros(()))
            self.copy_heads = nn.Parameter(torch.zeros(cfg.n_heads))
            if cfg.copy_recency:  # log-scale of each head's ALiBi slope in the copy's attention (0: the layer's)
                self.copy_slope_log_scale = nn.Parameter(torch.zeros(cfg.n_heads))
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
        if self.cfg.qk_init > 0:
            # q . k' = h^T W^T W h': with one random W for both, a random projection that keeps inner
            # products, so a query attends most to the cached examples most like it (and the copy
            # read-out copies their labels) before any step; with the default init (independent, std
            # 0.02) q . k is a near-zero random bilinear form and ALiBi recency decides
            d, which = self.cfg.d_model, self.cfg.qk_init_layers
            tied = self.blocks if which == "all" else [self.blocks[0 if which == "first" else -1]]
            with torch.no_grad():
                for block in tied:
                    w = block.qkv.weight  # (3d, d): rows [q | k | v]
                    w[:d].normal_(std=self.cfg.qk_init)
                    w[d:2 * d].copy_(w[:d])
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

    def attention_mask(
        self,
        tpos: torch.Tensor,  # (B, T) token positions of the chunk
        ctx_pos: torch.Tensor,  # (B, S) token positions of cached slots, -1 = empty
        isolated: bool = False,
        q_lo: torch.Tensor | None = None,
    ) -> AttentionMask:
        """The :class:`AttentionMask` of a forward over [sink, cache, chunk] keys.

        A key is attendable when it is valid, causal (strictly in kv mode) and, if
        ``isolated``, only the query itself within the chunk (held-out evaluation). ``q_lo``
        ``(B, T)`` optionally bounds each query's lowest attendable token position (used by
        the full-recomputation reference, which has no cache).
        """
        backend = resolve_backend(self.cfg.attn, tpos.device)
        bias = None
        if backend == "torch":  # one (B, H, T, 1+S+T) bias tensor for every layer; the fused kernels build
            # theirs from the positions, tile by tile
            bias = attention_bias(ctx_pos, tpos, self.slopes, self.kv_mode, isolated, q_lo, dtype=self.slopes.dtype)
        return AttentionMask(tpos, ctx_pos, self.slopes, self.kv_mode, isolated, q_lo, backend, bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, C, D) features
        y: torch.Tensor | None,  # (B, C) labels, K = unknown; unused when isolated; kv mode: None = no label terms
        pos: torch.Tensor,  # (B, C) example positions in each stream
        ctx: list[tuple[torch.Tensor, torch.Tensor]] | None = None,  # per layer (B, H, S, Dh) x2
        ctx_pos: torch.Tensor | None = None,  # (B, S)
        ctx_labels: torch.Tensor | None = None,  # (B, S) labels of the cached examples, -1 = none (copy)
        *,
        isolated: bool = False,
        q_lo: torch.Tensor | None = None,  # (B, T) token-position lower bound per query
        trace: list | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Returns logits ``(B, C, K)`` (log-probabilities with ``copy``), per-layer chunk keys and
        values ``(B, H, T, Dh)`` and the chunk's token positions ``(B, T)`` (T = C, or 2C in
        context mode)."""
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
            tpos = self.token_positions(pos)
        if ctx is None:
            empty = h.new_zeros(B, H, 0, d // H)
            ctx, ctx_pos = [(empty, empty)] * L, tpos.new_zeros(B, 0)
        mask = self.attention_mask(tpos, ctx_pos, isolated, q_lo)
        ks, vs = [], []
        for block, lab, (ctx_k, ctx_v) in zip(self.blocks, labs, ctx):
            h, k, v, qk = block(h, lab, ctx_k, ctx_v, mask, trace)
            ks.append(k)
            vs.append(v)
        if not self.kv_mode and not isolated:
            h = h[:, 0::2]  # predictions are read at x-tokens
        logits = self.head(self.ln_f(h))  # (B, C, K)
        if self.cfg.copy:
            chunk_labels = self.token_labels(y) if y is not None and not isolated else torch.full_like(tpos, -1)
            if ctx_labels is None:
                ctx_labels = torch.full_like(ctx_pos, -1)
            rows = slice(0, None, 2) if not self.kv_mode and not isolated else slice(None)  # the x-tokens' queries
            logits = self.copy_readout(logits, *qk, ctx[-1][0], ctx_labels, chunk_labels, mask, rows)
        return logits, ks, vs, tpos

    def token_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Token positions ``(B, T)`` of examples at positions ``pos (B, C)``: kv mode the same;
        context mode x-token ``2p``, y-token ``2p + 1``."""
        if self.kv_mode:
            return pos
        return (2 * pos[:, :, None] + torch.arange(2, device=pos.device)).flatten(1)

    def token_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The label each token of examples labelled ``y (B, C)`` carries, ``(B, T)``: kv mode the
        example's own; context mode -1 at x-tokens and the label at y-tokens."""
        if self.kv_mode:
            return y
        return torch.stack([torch.full_like(y, -1), y], dim=2).flatten(1)

    def copy_readout(
        self,
        logits: torch.Tensor,  # (B, T, K) the head's
        q: torch.Tensor,  # (B, H, T, Dh) the last layer's queries
        k: torch.Tensor,  # (B, H, T, Dh) and the chunk's keys (label terms in)
        ctx_k: torch.Tensor,  # (B, H, S, Dh) its cached keys
        ctx_labels: torch.Tensor,  # (B, S) their labels, -1 = none
        chunk_labels: torch.Tensor,  # (B, T) the chunk's, -1 or K = not revealed
        mask: AttentionMask,
        rows: slice = slice(None),  # the queries predictions are read at (context mode: x-tokens)
    ) -> torch.Tensor:
        """``copy``: the head's distribution mixed with a copy of the labels the last
        layer attends to, ``log((1 - lam m) softmax(logits) + lam sum_j a_j onehot(y_j))`` ``(B, T, K)``:
        a_j the last layer's attention weights on the labelled keys, averaged over heads with
        learned weights (softmax of ``copy_heads``: the heads' ALiBi slopes span recency scales), m
        their sum, lam = sigmoid(copy_gate). In-context learning from the first example: ALiBi
        makes the untrained attention recency-weighted, and training sharpens it (queries always;
        keys where they attend within a segment)."""
        B, H, T, Dh = q.shape
        bias = mask.bias
        if bias is None or self.cfg.copy_recency:  # the fused backends build theirs in the kernel; copy_recency
            # rescales each head's slope by a learned factor (1 at first): the bias is built from those
            slopes = mask.slopes * self.copy_slope_log_scale.exp() if self.cfg.copy_recency else mask.slopes
            bias = attention_bias(mask.ctx_pos, mask.tpos, slopes, mask.strict, mask.isolated, mask.q_lo, dtype=q.dtype)
        K = self.num_classes

        def onehot(labels: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, H, N, K); -1 or K: zeros
            known = (labels >= 0) & (labels < K)
            return F.one_hot(labels.where(known, K), K + 1)[..., :K].to(q.dtype)[:, None].expand(-1, H, -1, -1)

        # the layer's attention with one-hot labels for values (the sink's: nothing): (B, H, T', K)
        copied = sdpa_attention(q[:, :, rows], k, onehot(chunk_labels), None, None, ctx_k, onehot(ctx_labels),
                                mask.ctx_pos, mask.tpos, self.blocks[-1].sink_kv[0], q.new_zeros(H, K), mask.slopes,
                                mask.strict, bias=bias[:, :, rows])
        copied = torch.einsum("h,bhtk->btk", self.copy_heads.softmax(0), copied)  # (B, T', K)
        lam = torch.sigmoid(self.copy_gate)
        p = (1 - lam * copied.sum(-1, keepdim=True)) * logits.softmax(-1) + lam * copied
        return p.clamp_min(1e-12).log()
