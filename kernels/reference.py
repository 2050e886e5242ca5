"""Pure-PyTorch reference of the learner's windowed attention (the semantics the kernels match).

One chunk of T query tokens per stream attends to three groups of keys/values:

1. the layer's learned **sink** (one key/value per head, bias 0, always attendable, so
   every query row has at least one finite score);
2. the S slots of the stream's **ring-buffer cache**, read in storage order with the token
   position each slot holds (``cache_pos``, -1 = empty slot, masked). Slot order does not
   matter to a softmax, so nothing is unrolled or concatenated in position order;
3. the chunk's own T keys/values, **causally**.

Scores are ``q . k / sqrt(Dh) - slope_h * (q_pos - k_pos)`` (ALiBi, distance in tokens).
A cache or chunk key is attendable when its slot is filled and ``q_pos - k_pos >= 1``
(``strict``, the label-as-KV mode: a query never meets its own key, which carries its own
label: the own-label exclusion *is* strict causality on the diagonal) or ``>= 0``
(context mode). ``isolated`` (held-out evaluation) keeps only the diagonal of the chunk
block; ``q_lo`` optionally bounds each query's lowest attendable key position.

In label-as-KV mode the chunk's keys/values are ``k + k_label`` and ``v + v_label``: the
label term is passed separately so that the fused kernel can add it while it loads the
tile (and its gradient is the key/value gradient). Cached keys/values are constants
(detached): no gradient flows into the past.

This module is the readable specification; :func:`reference_attention` materialises the
``(B, H, T, 1+S+T)`` score matrix with plain tensor ops in fp32. :func:`sdpa_attention` is
the same computation through ``F.scaled_dot_product_attention`` with an explicit additive
mask: the ``torch`` backend, and what the learner did before the kernels existed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def key_positions(cache_pos: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Token positions of the non-sink keys ``[cache slots, chunk]``, ``(B, S+T)``."""
    return torch.cat([cache_pos, q_pos], dim=1)


def attention_bias(
    cache_pos: torch.Tensor,
    q_pos: torch.Tensor,
    slopes: torch.Tensor,
    strict: bool,
    isolated: bool = False,
    q_lo: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive bias over ``[sink, cache, chunk]`` keys, ``(B, H, T, 1+S+T)``, -inf = masked.

    Args:
        cache_pos: ``(B, S)`` long, token position held by each cache slot, -1 = empty.
        q_pos: ``(B, T)`` long, token positions of the chunk (its queries and its keys).
        slopes: ``(H,)`` ALiBi slopes per token of distance.
        strict: ``dist >= 1`` (label-as-KV mode) instead of ``dist >= 0``.
        isolated: within the chunk, a query sees only its own key (held-out evaluation).
        q_lo: ``(B, T)`` long or None, lowest attendable key position per query.
    """
    B, T = q_pos.shape
    S = cache_pos.shape[1]
    kpos = key_positions(cache_pos, q_pos)  # (B, S+T)
    dist = q_pos[:, :, None] - kpos[:, None, :]  # (B, T, S+T)
    ok = dist >= (1 if strict else 0)
    ok[:, :, :S] &= (cache_pos >= 0)[:, None, :]  # empty ring slots
    if isolated:
        ok[:, :, S:] &= torch.eye(T, dtype=torch.bool, device=q_pos.device)
    if q_lo is not None:
        ok &= kpos[:, None, :] >= q_lo[:, :, None]
    bias = -slopes.to(dtype)[:, None, None] * dist[:, None].to(dtype)  # (B, H, T, S+T)
    bias = bias.masked_fill(~ok[:, None], float("-inf"))
    sink = bias.new_zeros(B, bias.shape[1], T, 1)  # the sink: bias 0, never masked
    return torch.cat([sink, bias], dim=3)


def _constant(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` detached, in ``dtype`` (no op where it already is: the learner's step is bound by
    per-op overhead on a CPU)."""
    t = t.detach() if t.requires_grad else t
    return t if t.dtype == dtype else t.to(dtype)


def _keys_values(q, k, v, k_label, v_label, k_cache, v_cache, sink_k, sink_v):
    """``[sink, cache, chunk]`` keys ``(B, H, 1+S+T, Dh)`` and values ``(B, H, 1+S+T, Dv)`` (Dv: the
    values' own width, Dh in the learner's layers; the copy read-out attends to one-hot labels)."""
    B, H, _, Dh = q.shape
    if k_label is not None:
        k = k + k_label
    if v_label is not None:
        v = v + v_label
    sink_k = sink_k if sink_k.dtype == k.dtype else sink_k.to(k.dtype)
    sink_v = sink_v if sink_v.dtype == v.dtype else sink_v.to(v.dtype)
    keys = torch.cat([sink_k.unsqueeze(1).expand(B, H, 1, Dh), _constant(k_cache, k.dtype), k], dim=2)
    vals = torch.cat([sink_v.unsqueeze(1).expand(B, H, 1, -1), _constant(v_cache, v.dtype), v], dim=2)
    return keys, vals


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_label: torch.Tensor | None,
    v_label: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_pos: torch.Tensor,
    q_pos: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    slopes: torch.Tensor,
    strict: bool,
    isolated: bool = False,
    q_lo: torch.Tensor | None = None,
) -> torch.Tensor:
    """The specification, in fp32 with an explicit softmax (see the module docstring).

    Args:
        q, k, v: ``(B, H, T, Dh)`` the chunk's queries, keys, values (keys/values without label).
        k_label, v_label: ``(B, H, T, Dh)`` label terms added to the chunk's keys/values, or None.
        k_cache, v_cache: ``(B, H, S, Dh)`` the ring buffer (S may be 0); no gradient.
        cache_pos: ``(B, S)`` long, token position of each slot, -1 = empty.
        q_pos: ``(B, T)`` long, token positions of the chunk.
        sink_k, sink_v: ``(H, Dh)`` the layer's attention sink.
        slopes: ``(H,)`` ALiBi slopes. strict, isolated, q_lo: see :func:`attention_bias`.
    Returns:
        ``(B, H, T, Dh)`` in q's dtype.
    """
    keys, vals = _keys_values(q, k, v, k_label, v_label, k_cache, v_cache, sink_k, sink_v)
    bias = attention_bias(cache_pos, q_pos, slopes, strict, isolated, q_lo)  # (B, H, T, 1+S+T)
    scores = q.float() @ keys.float().transpose(2, 3) / math.sqrt(q.shape[-1]) + bias
    return (scores.softmax(dim=-1) @ vals.float()).to(q.dtype)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_label: torch.Tensor | None,
    v_label: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_pos: torch.Tensor,
    q_pos: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    slopes: torch.Tensor,
    strict: bool,
    isolated: bool = False,
    q_lo: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same arguments and result as :func:`reference_attention`, through concatenation and
    ``F.scaled_dot_product_attention`` with an explicit additive mask (in q's dtype).

    ``bias``: :func:`attention_bias` of these positions and flags, when the caller already
    has it (a model's layers share one per forward); ``None`` builds it here."""
    keys, vals = _keys_values(q, k, v, k_label, v_label, k_cache, v_cache, sink_k, sink_v)
    if bias is None:
        bias = attention_bias(cache_pos, q_pos, slopes, strict, isolated, q_lo, dtype=q.dtype)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=bias)
