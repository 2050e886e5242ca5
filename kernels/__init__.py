"""Attention kernels of the transformer learner (``ocl.kernels``), each next to its PyTorch reference.

- :func:`windowed_attention`: the one public entry point, backend ``auto|triton|torch|flex``.
- :mod:`.reference`: the readable specification (and the SDPA path).
- :mod:`.triton_attention`: Triton forward/backward kernels (imported lazily: importing
  triton is slow and ``TRITON_INTERPRET`` must be set before it).
- :mod:`.flex`: the FlexAttention path, the library alternative.
"""

from .attention import BACKENDS, check_backend, resolve_backend, windowed_attention
from .reference import reference_attention, sdpa_attention

__all__ = ["BACKENDS", "check_backend", "reference_attention", "resolve_backend", "sdpa_attention",
           "windowed_attention"]
