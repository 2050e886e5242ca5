"""FlexAttention path of the windowed attention: the library alternative the kernels are measured against.

``torch.nn.attention.flex_attention`` takes one key tensor, so this path concatenates
``[sink, cache, chunk]`` (like the SDPA path) and expresses ALiBi as a ``score_mod`` and
the sliding-window/causal/empty-slot rule as a ``mask_mod`` turned into a block mask.

Where it runs (torch 2.15):

- CUDA: forward and backward, compiled (``torch.compile(flex_attention)``, one compile
  per shape: the learner's shapes are static, so that happens once per chunk size).
- CPU: **forward only**. PyTorch raises on CPU backward, so a call that needs gradients
  raises :class:`ValueError` here; the learner refuses ``attn=flex`` on CPU. The
  CPU forward runs eagerly (unfused: it materialises the scores, slower than SDPA); a
  compiled CPU forward works too but costs ~20 s of compile per shape.
"""

from __future__ import annotations

import functools
import warnings

import torch


from .reference import _keys_values


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_windowed_attention(
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
    """Same arguments and result as :func:`ocl.kernels.reference.reference_attention`."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, _ = q.shape
    S = k_cache.shape[2]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, k_label, v_label, sink_k, sink_v))
    if q.device.type == "cpu" and needs_grad:
        raise ValueError("attn='flex' has no CPU backward in PyTorch (FlexAttention supports CPU inference only); "
                       "use attn='torch' on CPU or run on a CUDA device.")
    keys, vals = _keys_values(q, k, v, k_label, v_label, k_cache, v_cache, sink_k, sink_v)  # (B, H, 1+S+T, Dh)
    if not needs_grad:  # flex checks requires_grad, not grad mode: inference under no_grad must pass
        q, keys, vals = q.detach(), keys.detach(), vals.detach()
    # Key positions with the sink at index 0; empty slots flagged separately.
    kpos = torch.cat([q_pos.new_zeros(B, 1), cache_pos, q_pos], dim=1)  # (B, 1+S+T)
    filled = torch.cat([cache_pos.new_ones(B, 1, dtype=torch.bool), cache_pos >= 0,
                        q_pos.new_ones(B, T, dtype=torch.bool)], dim=1)  # (B, 1+S+T)
    slopes = slopes.to(torch.float32)
    lo = q_lo if q_lo is not None else torch.full_like(q_pos, torch.iinfo(torch.long).min)
    min_dist = 1 if strict else 0

    def score_mod(score, b, h, qi, ki):
        dist = (q_pos[b, qi] - kpos[b, ki]).to(torch.float32)
        return torch.where(ki == 0, score, score - slopes[h] * dist)

    def mask_mod(b, h, qi, ki):
        in_chunk = ki >= 1 + S
        ok = filled[b, ki] & (q_pos[b, qi] - kpos[b, ki] >= min_dist) & (kpos[b, ki] >= lo[b, qi])
        if isolated:
            ok = ok & (~in_chunk | (ki - 1 - S == qi))
        return (ki == 0) | ok

    block_mask = create_block_mask(mask_mod, B, None, T, 1 + S + T, device=q.device)
    if q.device.type == "cuda":
        return _compiled_flex()(q, keys, vals, score_mod=score_mod, block_mask=block_mask)
    with warnings.catch_warnings():  # the "unfused without torch.compile" warning: known, documented above
        warnings.simplefilter("ignore")
        return flex_attention(q, keys, vals, score_mod=score_mod, block_mask=block_mask)
