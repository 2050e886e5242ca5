"""Turn whatever a user's ``_target_`` returned into a :class:`Source`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np

from ocl.errors import OCLError
from ocl.streams.arrays import _as_array, _labels
from ocl.streams.base import ArrayImageSet, ImageSet, Source, dense_classes

log = logging.getLogger(__name__)

_EXPECTED = (
    "a Source; a dict {'train': ..., 'test': ... (optional), 'classes': [...] (optional)}; "
    "a tuple (x_array, y_array); a map-style dataset or an iterable of (image, label) pairs"
)


def _is_tensor(v: Any) -> bool:
    return "torch" in sys.modules and isinstance(v, sys.modules["torch"].Tensor)


def _is_pil(v: Any) -> bool:
    return "PIL.Image" in sys.modules and isinstance(v, sys.modules["PIL.Image"].Image)


def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or _is_tensor(v)


def _pixels(a: np.ndarray, where: str) -> np.ndarray:
    """Scale float [0, 1] to uint8; accept whole numbers in 0..255 as they are."""
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = (float(np.min(a)), float(np.max(a))) if a.size else (0.0, 0.0)
        if 0.0 <= lo and hi <= 1.0:  # ToTensor() range
            return np.round(a * 255.0).astype(np.uint8)
        if not (0.0 <= lo and hi <= 255.0 and np.all(a == np.round(a))):
            raise OCLError(
                f"{where}: float images must lie in [0, 1] (as ToTensor() gives) or be whole numbers "
                f"0..255; found [{lo:g}, {hi:g}]. Drop Normalize() from the dataset's transform."
            )
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise OCLError(f"{where}: integer images must lie in 0..255; found [{a.min()}, {a.max()}].")
        return a.astype(np.uint8)
    raise OCLError(f"{where}: unsupported image dtype {a.dtype}.")


def _to_nhwc(x: Any, where: str, batched: bool) -> np.ndarray:
    """One image (or a batch when ``batched``) -> ``(b, H, W, C)`` uint8, or ``(b, D)`` float32 vectors.

    Tensors are read as ``(C, H, W)`` (torchvision's layout), numpy arrays and PIL images
    as ``(H, W[, C])``.
    """
    if _is_pil(x) and not batched:
        x = x.convert("L" if x.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
        a = np.asarray(x)
        return (a if a.ndim == 3 else a[..., None])[None]
    tensor = _is_tensor(x)
    if tensor:
        a = x.detach().cpu().numpy()
    elif isinstance(x, np.ndarray):
        a = x
    else:
        raise OCLError(f"{where}: image is a {type(x).__name__}; expected a PIL image, numpy array or torch tensor.")
    if not batched:
        a = a[None]
    if a.ndim == 2:  # (b, D) feature vectors
        return a.astype(np.float32)
    if a.ndim == 4 and (tensor or (a.shape[-1] not in (1, 3) and a.shape[1] in (1, 3))):
        a = a.transpose(0, 2, 3, 1)  # (b, C, H, W) -> (b, H, W, C)
    elif a.ndim == 3:
        a = a[..., None]  # (b, H, W) grayscale
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        shape = tuple(x.shape)
        raise OCLError(
            f"{where}: image of shape {shape} is not (C, H, W) tensor / (H, W[, C]) array with 1 or 3 "
            "channels, nor a 1-D feature vector."
        )
    return _pixels(a, where)


def _to_label(y: Any, where: str) -> int:
    if _is_tensor(y) or isinstance(y, np.ndarray):
        if y.size != 1:
            raise OCLError(f"{where}: label has shape {tuple(y.shape)}; expected one integer class index.")
        y = y.reshape(-1)[0].item()
    if isinstance(y, Integral) and not isinstance(y, bool):
        return int(y)
    if isinstance(y, Real) and float(y).is_integer():
        return int(y)
    raise OCLError(f"{where}: label {y!r} is not an integer class index (map class names to 0..K-1).")


def _materialize(items: Iterable, where: str) -> ArrayImageSet:
    """Read ``(image, label)`` pairs (or ``(images, labels)`` batches, e.g. a DataLoader) into memory."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for i, item in enumerate(items):
        w = f"{where}: item {i}"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise OCLError(f"{w} is {type(item).__name__} {_short(item)}; expected an (image, label) pair.")
        x, y = item
        batched = _is_array(y) and np.ndim(y) == 1  # a DataLoader batch: (B, ...) images, (B,) labels
        if batched:
            yb = np.asarray([_to_label(v, w) for v in (y.tolist() if _is_tensor(y) else y)], dtype=np.int64)
        else:
            yb = np.asarray([_to_label(y, w)], dtype=np.int64)
        xb = _to_nhwc(x, w, batched)
        if xb.shape[0] != yb.shape[0]:
            raise OCLError(f"{w}: batch of {xb.shape[0]} images but {yb.shape[0]} labels.")
        if xs and xb.shape[1:] != xs[0].shape[1:]:
            raise OCLError(
                f"{w} has shape {xb.shape[1:]} (H, W, C) but item 0 has {xs[0].shape[1:]}; "
                "all items must have one size (resize them in the dataset's transform)."
            )
        xs.append(xb)
        ys.append(yb)
    if not xs:
        raise OCLError(f"{where}: the dataset yielded no items.")
    data = np.concatenate(xs)
    log.info("%s: materialized %d items of shape %s", where, data.shape[0], data.shape[1:])
    return ArrayImageSet(data, np.concatenate(ys), where)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_xy_arrays(obj: Any) -> bool:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2 or not _is_array(obj[0]):
        return False
    x, y = obj
    return np.ndim(x) >= 2 and np.ndim(y) == 1 and len(y) == len(x)


def _to_imageset(obj: Any, where: str) -> ImageSet:
    if isinstance(obj, ImageSet):
        return obj
    if _is_xy_arrays(obj):
        return ArrayImageSet(_to_nhwc(obj[0], where, batched=True), _labels(_as_array(obj[1], where), where), where)
    if isinstance(obj, (str, bytes, Mapping)) or not isinstance(obj, Iterable) and not hasattr(obj, "__getitem__"):
        raise OCLError(f"{where}: got a {type(obj).__name__}; expected {_EXPECTED}.")
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):  # map-style dataset
        return _materialize((obj[i] for i in range(len(obj))), where)
    return _materialize(obj, where)


def _declared_classes(obj: Any) -> list[str] | None:
    classes = getattr(obj, "classes", None)  # torchvision datasets carry their class names
    if isinstance(classes, (list, tuple)) and classes:
        return [str(c) for c in classes]
    return None


def to_source(obj: Any, name: str = "custom") -> Source:
    """Turn ``obj`` into a :class:`Source`, reading datasets and iterables into memory.

    Accepts a Source (returned as is); an ImageSet; a dict with ``"train"`` and optional
    ``"test"`` and ``"classes"`` (values: any of the forms below); a tuple
    ``(x, y)`` of arrays; a map-style dataset (``len`` + ``[i]``) or any iterable of
    ``(image, label)`` pairs or batches, where an image is a PIL image, a numpy
    ``(H, W[, C])`` uint8 array, or a torch ``(C, H, W)`` tensor (float in [0, 1] or uint8).
    Classes default to the dataset's ``classes`` attribute, else ``str(i)`` up to the
    largest label; labels that leave indices unused (0 and 1,000,000) are renumbered to
    ``0..K-1`` (:func:`~ocl.streams.base.dense_classes`; ``Source.label_map``).
    """
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, Mapping):
        unknown = set(obj) - {"train", "test", "classes"}
        if "train" not in obj or unknown:
            raise OCLError(
                f"{name}: a dict source needs key 'train' (and optionally 'test', 'classes'); "
                f"got keys {sorted(map(str, obj))}."
            )
        train = _to_imageset(obj["train"], f"{name} (train)")
        test = None if obj.get("test") is None else _to_imageset(obj["test"], f"{name} (test)")
        classes = obj.get("classes") or _declared_classes(obj["train"])
    else:
        train, test = _to_imageset(obj, name), None
        classes = _declared_classes(obj)
    label_map = None
    if classes is None:
        classes, label_map = dense_classes({"train": train, "test": test}, name)
    return Source(name=name, train=train, test=test, classes=classes, label_map=label_map)
