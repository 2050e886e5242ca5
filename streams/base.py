"""Core data types shared by every stream source.

A *source* is a labelled image data set with an optional held-out test split. Images
are read lazily through :class:`ImageSet` so that a run whose features are already
cached never decodes a single image.

Conventions (all sources):
- images are ``uint8`` arrays of shape ``(n, H, W, C)`` with ``C`` in {1, 3};
  a source may also hold ready-made feature vectors ``(n, D)`` (``float32``), which
  only the ``pixels`` backbone accepts (it passes vectors through);
- labels are ``int64`` class indices in ``[0, len(classes))``, checked on load.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ocl.errors import OCLError

log = logging.getLogger(__name__)


class ImageSet:
    """A fixed, ordered, labelled collection of images read on demand.

    Subclasses implement :meth:`get` and :meth:`fingerprint`; ``labels`` is always
    in memory (``(n,)`` int64).
    """

    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get(self, idx: np.ndarray) -> np.ndarray:
        """Return the items at ``idx`` as ``(len(idx), H, W, C)`` uint8 (or ``(len(idx), D)``)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hex digest that changes whenever the content or labels change (cache key)."""
        raise NotImplementedError


class ArrayImageSet(ImageSet):
    """An :class:`ImageSet` held in memory.

    Args:
        data: ``(n, H, W)``, ``(n, H, W, C)`` uint8 images, or ``(n, D)`` feature vectors.
        labels: ``(n,)`` integer labels.
        where: a description of where the data came from, used in error messages.
    """

    def __init__(self, data: np.ndarray, labels: np.ndarray, where: str = "arrays") -> None:
        data = np.asarray(data)
        labels = np.asarray(labels)
        if data.ndim == 3:  # (n, H, W) grayscale -> (n, H, W, 1)
            data = data[..., None]
        if data.ndim not in (2, 4):
            raise OCLError(
                f"{where}: expected images of shape (n, H, W), (n, H, W, C) or feature "
                f"vectors (n, D); got shape {tuple(data.shape)}."
            )
        if data.ndim == 4 and data.shape[-1] not in (1, 3):
            raise OCLError(
                f"{where}: images must have 1 or 3 channels in the last axis (n, H, W, C); "
                f"got shape {tuple(data.shape)}."
            )
        if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
            raise OCLError(
                f"{where}: labels must have shape ({data.shape[0]},) to match the data; "
                f"got {tuple(labels.shape)}."
            )
        if labels.size and labels.dtype.kind not in "biuf":  # strings, objects: np.mod would fail obscurely
            kind = {"U": "text", "S": "bytes", "O": "Python object"}.get(labels.dtype.kind, str(labels.dtype))
            first = repr(labels.reshape(-1)[0].item())
            raise OCLError(
                f"{where}: labels must be integer class indices 0..K-1; got {kind} labels (dtype {labels.dtype}, "
                f"e.g. {first[:40]}). Map class names to indices, e.g. names, y = np.unique(y, return_inverse=True) "
                "(and pass the names as classes)."
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.equal(np.mod(labels, 1), 0)):
                raise OCLError(f"{where}: labels must be integers; got dtype {labels.dtype}.")
        if data.ndim == 4:
            if data.dtype != np.uint8:
                if data.size and not np.isfinite(data).all():
                    raise OCLError(f"{where}: images contain NaN or inf values.")
                if data.size and (data.min() < 0 or data.max() > 255 or np.any(data != np.round(data))):
                    # Refuse rather than truncate: float images in [0, 1] would silently become zeros.
                    raise OCLError(
                        f"{where}: images must be integers in [0, 255] (uint8); got {data.dtype} values in "
                        f"[{float(data.min()):g}, {float(data.max()):g}]. Scale float images with "
                        f"(x * 255).round().astype('uint8') first."
                    )
                data = data.astype(np.uint8)
        else:
            data = data.astype(np.float32, copy=False)
            if not np.isfinite(data).all():
                bad = int(np.flatnonzero(~np.isfinite(data).all(axis=1))[0])
                raise OCLError(f"{where}: feature vector {bad} contains NaN or inf.")
        self.data = data
        self.labels = labels.astype(np.int64)
        self._fp: str | None = None

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.data[np.asarray(idx)]

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha1()
            h.update(str((self.data.shape, self.data.dtype.str)).encode())
            h.update(np.ascontiguousarray(self.data).data)
            h.update(np.ascontiguousarray(self.labels).data)
            self._fp = h.hexdigest()
        return self._fp


class LabelSet(ImageSet):
    """The labels of an :class:`ImageSet` without its images: what a process needs that
    builds streams over features extracted elsewhere (a compare worker, a Ray task).

    Args:
        labels: ``(n,)`` int64 labels.
        fingerprint: the fingerprint of the image set these labels came from.
    """

    def __init__(self, labels: np.ndarray, fingerprint: str) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self._fp = fingerprint

    def get(self, idx: np.ndarray) -> np.ndarray:
        raise OCLError("a compare worker holds labels only (features were extracted by the parent); "
                       "a protocol that reads images cannot run with workers > 1: use workers=1.")

    def fingerprint(self) -> str:
        return self._fp


@dataclass
class Source:
    """A labelled data set: a training stream and an optional held-out test split.

    Attributes:
        name: short name used in results and cache keys (e.g. ``"cifar10"``).
        train: the examples the stream is built from.
        test: held-out examples for task-boundary evaluation, or ``None``.
        classes: class names; labels index this list.
        label_map: the label each class had in the data, when the data's labels were sparse ids
            renumbered to classes ``0..K-1`` (:func:`dense_classes`); None when they were used as given.
    """

    name: str
    train: ImageSet
    test: ImageSet | None
    classes: Sequence[str]
    label_map: list[int] | None = None

    def __post_init__(self) -> None:
        self.classes = [str(c) for c in self.classes]
        for split, s in (("train", self.train), ("test", self.test)):
            if s is not None:
                check_labels(s.labels, len(self.classes), f"{self.name} ({split})")
        if len(self.train) == 0:
            raise OCLError(f"{self.name}: the training split is empty; nothing to stream.")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def labels_only(source: Source) -> Source:
    """A copy of ``source`` whose splits carry labels only (:class:`LabelSet`: cheap to send to
    another process; the protocol needs labels to build a stream, never images)."""
    test = None if source.test is None else LabelSet(source.test.labels, source.test.fingerprint())
    return Source(source.name, LabelSet(source.train.labels, source.train.fingerprint()), test,
                  list(source.classes), source.label_map)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise :class:`OCLError` if any label lies outside ``[0, num_classes)``."""
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise OCLError(
            f"{where}: label {int(labels[bad])} at index {bad} is outside the declared "
            f"{num_classes} classes [0, {num_classes - 1}]."
        )


def dense_classes(splits: dict[str, ImageSet | None], where: str) -> tuple[list[str], list[int] | None]:
    """Class names for integer labels given without names, and the label map: ``["0", ..., "K-1"]``
    and None when the labels are ``0..K-1`` with every index used; otherwise the labels are
    renumbered in place to ``0..K-1`` in increasing order (so class order, and with it a split
    protocol's tasks, follow the original ids), the classes are named by their original ids, and
    the map (class -> original label) is returned. Labels 0 and 1,000,000 used to make a
    1,000,001-class learner (a 68 MB checkpoint, 14.5 ex/s) and 0 and 10**9 a MemoryError.

    Args:
        splits: ``{"train": ..., "test": ...}``; a None or empty split is skipped.
        where: the source's name, for messages.

    Raises:
        OCLError: a negative label (not a class index, and not renumbered: likely a mistake).
    """
    sets = {k: s for k, s in splits.items() if s is not None and len(s)}
    if not sets:
        return ["0"], None
    hi = max(int(s.labels.max()) for s in sets.values())
    for split, s in sets.items():
        if int(s.labels.min()) < 0:
            check_labels(s.labels, hi + 1, f"{where} ({split})")  # raises, naming the first negative label
    used = np.unique(np.concatenate([s.labels for s in sets.values()]))
    if used.size == hi + 1:
        return [str(i) for i in range(hi + 1)], None
    given = [type(s).__name__ for s in sets.values() if not isinstance(s, ArrayImageSet)]
    if given:  # an image set of the caller's own: not ours to rewrite
        raise OCLError(f"{where}: labels are not 0..K-1 ({used.size} distinct values up to {hi}) in a {given[0]} "
                       "given as is; renumber them (np.unique(y, return_inverse=True)) or pass the classes.")
    for s in sets.values():
        s.labels = np.searchsorted(used, s.labels).astype(np.int64)
        s._fp = None  # type: ignore[attr-defined]  # the fingerprint covers the labels
    n = sum(len(s) for s in sets.values())
    log.info("%s: labels are not 0..K-1 (%d distinct values up to %d): renumbered to classes 0..%d in label order; "
             "results.json records the original labels as label_map", where, used.size, hi, used.size - 1)
    if used.size > n // 2:
        log.warning("%s: %d distinct labels in %d examples: are these class labels (not ids or targets)?",
                    where, used.size, n)
    return [str(v) for v in used.tolist()], used.tolist()
