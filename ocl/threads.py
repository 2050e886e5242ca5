"""Torch's intra-op thread count, set for a block and restored after it."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ocl.errors import OCLError


@contextlib.contextmanager
def torch_threads(threads: int | None, setting: str = "threads") -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads (``None``: unchanged); restores
    the previous setting after. Yields the thread count in effect.

    Args:
        threads: the thread count, or ``None`` to leave torch's setting alone.
        setting: the config key it came from, named in the error for a bad value.
    """
    before = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or int(threads) < 1:
            raise OCLError(f"{setting}={threads}: must be >= 1 (or null for torch's default).")
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
