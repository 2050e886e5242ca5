"""The learner's windowed attention behind one function, with a backend switch.

Backends (all the same semantics, :mod:`ocl.kernels.reference`):

- ``"triton"``: fused forward/backward kernels (:mod:`ocl.kernels.triton_attention`), the
  cache read in place from the ring buffer, the label term fused into the key/value tiles.
  CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first
  imported (the numpy interpreter: for tests, not for speed).
- ``"torch"``: concatenation + ``F.scaled_dot_product_attention`` with an explicit mask.
- ``"flex"``: FlexAttention with a ``score_mod``/block mask (:mod:`ocl.kernels.flex`);
  forward only on CPU.
- ``"auto"``: ``"triton"`` for CUDA tensors when triton imports, else ``"torch"``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import sdpa_attention

BACKENDS = ("auto", "torch", "triton", "flex")


def triton_available() -> bool:
    """Whether the triton package is installed (it is imported lazily, on first use)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Whether the triton kernels run (or will run) in the CPU interpreter."""
    import sys

    mod = sys.modules.get(f"{__package__}.triton_attention")
    if mod is not None:  # decided when the kernels were decorated
        return mod.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for ``backend`` on ``device`` (``"auto"`` -> triton on CUDA, else torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}.")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    return backend


def check_backend(backend: str, device: torch.device | str, training: bool = True) -> str:
    """Resolve ``backend`` and raise :class:`ValueError` early if it cannot run on ``device``
    (the learner turns it into its user error, naming ``learner.attn``).

    Args:
        training: whether gradients will be needed (FlexAttention has no CPU backward).
    Returns:
        The resolved backend name.
    """
    name = resolve_backend(backend, device)
    dev = torch.device(device).type
    if name == "triton":
        if not triton_available():
            raise ValueError("attn='triton' needs the triton package (pip install triton); or use attn='torch'.")
        if dev != "cuda" and not _interpreting():
            raise ValueError(f"attn='triton' needs a CUDA device (got {dev!r}); use attn='auto' or 'torch' on CPU "
                           "(TRITON_INTERPRET=1 runs the kernels on CPU, for testing only: very slow).")
    if name == "flex" and dev == "cpu" and training:
        raise ValueError("attn='flex' has no CPU backward in PyTorch (FlexAttention supports CPU inference only); "
                       "use attn='torch' on CPU or run on a CUDA device.")
    return name


def windowed_attention(
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
    *,
    isolated: bool = False,
    q_lo: torch.Tensor | None = None,
    backend: str = "auto",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a chunk over [sink, ring-buffer cache, causal chunk] with ALiBi.

    Each of the T queries of a stream attends to the layer's sink (bias 0, always), to the S
    cache slots that are filled (``cache_pos >= 0``) and to the chunk's own keys, with score
    ``q.k / sqrt(Dh) - slope_h * (q_pos - k_pos)``; a key is visible when
    ``q_pos - k_pos >= 1`` (``strict``: label-as-KV, a query never meets its own label) or
    ``>= 0``. Chunk positions must increase along T (the triton kernel skips the tiles above
    the diagonal by index) unless ``isolated``.

    Args:
        q, k, v: ``(B, H, T, Dh)`` the chunk's queries, keys and values (keys/values without
            the label term). Any strides with a unit last stride.
        k_label, v_label: ``(B, H, T, Dh)`` label terms added to the chunk's keys/values
            (label-as-KV mode), or None.
        k_cache, v_cache: ``(B, H, S, Dh)`` the ring buffer, S >= 0, e.g. a view of
            :class:`ocl.learners.transformer.kv_cache.KVCache` storage; treated as constants (no grad).
        cache_pos: ``(B, S)`` long, token position held by each slot, -1 = empty.
        q_pos: ``(B, T)`` long, token positions of the chunk.
        sink_k, sink_v: ``(H, Dh)`` the attention sink (gradients flow to it).
        slopes: ``(H,)`` ALiBi slopes per token of distance.
        strict: strictly causal (label-as-KV) instead of causal including the diagonal.
        isolated: within the chunk each query sees only its own key (held-out evaluation).
        q_lo: ``(B, T)`` long, lowest attendable key position per query, or None.
        backend: ``"auto" | "triton" | "torch" | "flex"`` (see the module docstring).
        bias: ``torch`` backend: the :func:`~ocl.kernels.reference.attention_bias` of these
            positions, when the caller has built it already (a model's layers share one per
            forward); the fused backends build theirs tile by tile and never read it.
    Returns:
        ``(B, H, T, Dh)`` in q's dtype. Differentiable in q, k, v, the label terms and the sink.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, k_label, v_label, sink_k, sink_v))
    name = check_backend(backend, q.device, training=needs_grad)
    args = (q, k, v, k_label, v_label, k_cache, v_cache, cache_pos, q_pos, sink_k, sink_v, slopes, strict)
    if name == "torch":
        return sdpa_attention(*args, isolated, q_lo, bias)
    if name == "flex":
        from .flex import flex_windowed_attention

        return flex_windowed_attention(*args, isolated, q_lo)
    if q.shape[2] == 0:  # an empty chunk: nothing to launch (a zero-size grid is an error)
        return q.clone()
    from .triton_attention import WindowedAttentionFn

    return WindowedAttentionFn.apply(*args, bool(isolated), q_lo)
