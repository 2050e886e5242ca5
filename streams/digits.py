"""scikit-learn's bundled handwritten digits: 1797 8x8 grayscale images, no download."""

from __future__ import annotations

import numpy as np

from ocl.errors import OCLError
from ocl.streams.base import ArrayImageSet, Source


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Source:
    """Load the digits as ``(n, 8, 8, 1)`` uint8 (0..16 scaled to 0..255), classes "0".."9".

    A stratified ``test_fraction`` of the images is held out (deterministic given
    ``seed``); ``test_fraction=0`` keeps every image for training and gives no test split.
    Both splits keep the original dataset order.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 <= test_fraction < 1.0:
        raise OCLError(f"digits: test_fraction must lie in [0, 1); got {test_fraction}.")
    d = sk_load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), values 0..16 -> 0..255
    y = d.target.astype(np.int64)
    classes = [str(c) for c in d.target_names]
    if test_fraction == 0.0:
        return Source(name="digits", train=ArrayImageSet(x, y, "digits"), test=None, classes=classes)
    idx = np.arange(len(y))
    try:
        tr, te = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    except ValueError as e:  # e.g. too few test images to hold every class
        raise OCLError(f"digits: cannot hold out test_fraction={test_fraction} stratified ({e}).") from e
    tr, te = np.sort(tr), np.sort(te)
    return Source(
        name="digits",
        train=ArrayImageSet(x[tr], y[tr], "digits (train)"),
        test=ArrayImageSet(x[te], y[te], "digits (test)"),
        classes=classes,
    )
