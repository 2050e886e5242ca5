"""Sources from numpy arrays: a ``.npz``, ``.npy`` files, or arrays in memory."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ocl.errors import OCLError, storage_error
from ocl.streams.base import ArrayImageSet, Source, dense_classes
from ocl.streams.download import missing_files

log = logging.getLogger(__name__)

_NPZ_KEYS = (("x_train", "y_train"), ("x", "y"))


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _check_magic(path: str, magic: bytes, what: str, hint: str) -> None:
    """Refuse a file that is not of its kind at all (a text file named .npz) before numpy
    guesses at it (numpy's message for that talks about pickles)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise storage_error(e, path, f"reading {what}") from e
    if not head.startswith(magic):
        raise OCLError(f"{path}: not {what} ({hint}); it starts with {head!r}.")


def _load_npy(path: str, what: str) -> np.ndarray:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise missing_files(what, [path], "check the path of the .npy file.")
    _check_magic(path, _NPY_MAGIC, "a .npy file", "one array saved with np.save")
    try:
        return np.load(path, allow_pickle=False)  # pickled object arrays could run code
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise OCLError(f"{path}: {what} holds Python objects (dtype object), which ocl does not load (unpickling "
                           "can run code); save numbers (labels as integers 0..K-1).") from e
        raise OCLError(f"{path}: cannot read {what} as a numpy array ({e}).") from e
    except (OSError, EOFError) as e:
        raise OCLError(f"{path}: cannot read {what} as a numpy array ({e}).") from e


def _as_array(v: Any, what: str) -> np.ndarray | None:
    if v is None:
        return None
    if isinstance(v, (str, os.PathLike)):
        return _load_npy(str(v), what)
    if hasattr(v, "detach"):  # torch tensor, without importing torch
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def _images(x: np.ndarray, where: str) -> np.ndarray:
    """Float images in [0, 1] become uint8 0..255; everything else goes to ArrayImageSet as is."""
    if x.ndim in (3, 4) and np.issubdtype(x.dtype, np.floating) and x.size:
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        if lo >= 0.0 and hi <= 1.0:
            log.info("%s: float images in [0, 1]; scaling to uint8 0..255", where)
            return np.round(x * 255.0).astype(np.uint8)
        if not np.all(x == np.round(x)):
            raise OCLError(
                f"{where}: float images must hold values in [0, 1] or whole numbers 0..255; "
                f"found range [{lo:g}, {hi:g}] with fractions."
            )
    return x


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise OCLError(
            f"{where}: labels must be class indices of shape (n,); got shape {tuple(y.shape)}"
            + (" (one-hot? use y.argmax(1))." if y.ndim == 2 else ".")
        )
    return y


def load_arrays(
    path: str | None = None,
    x: Any = None,
    y: Any = None,
    x_test: Any = None,
    y_test: Any = None,
    classes: list[str] | None = None,
    name: str = "arrays",
) -> Source:
    """Build a source from arrays.

    Images are ``(n, H, W)`` / ``(n, H, W, C)`` uint8 (float in [0, 1] is scaled), or
    ``(n, D)`` feature vectors; labels ``(n,)`` integers.

    Args:
        path: a ``.npz`` with ``x_train``/``y_train`` (+ optional ``x_test``/``y_test``)
            or ``x``/``y``; or a folder holding ``x_train.npy``/``y_train.npy``
            (+ ``x_test.npy``/``y_test.npy``) or ``x.npy``/``y.npy``; or an ``.npy`` of
            images, whose labels come from ``y``.
        x, y, x_test, y_test: arrays (numpy, torch, lists) or paths of ``.npy`` files.
        classes: class names; default ``str(i)`` for ``i`` up to the largest label, or, when
            the labels leave indices unused (0 and 1,000,000), the labels renumbered to
            ``0..K-1`` and named by their values (:func:`~ocl.streams.base.dense_classes`).
        name: source name.
    """
    arrays = {"x_train": x, "y_train": y, "x_test": x_test, "y_test": y_test}
    if path is not None:
        path = os.path.abspath(os.path.expanduser(str(path)))
        given = {k: v for k, v in arrays.items() if v is not None}
        if path.endswith(".npz"):
            if not os.path.isfile(path):
                raise missing_files(name, [path], "check the path of the .npz file.")
            _check_magic(path, _ZIP_MAGIC, "a .npz archive", "a zip of .npy arrays, as np.savez writes")
            try:
                with np.load(path, allow_pickle=False) as z:
                    stored = {k: z[k] for k in z.files}
            except ValueError as e:
                if "pickle" in str(e) or "Object arrays" in str(e):
                    raise OCLError(f"{path}: an array in the archive holds Python objects (dtype object), which ocl "
                                   "does not load (unpickling can run code); save numbers (labels as integers "
                                   "0..K-1).") from e
                raise OCLError(f"{path}: cannot read the .npz archive ({e}).") from e
            except (OSError, EOFError) as e:
                raise OCLError(f"{path}: cannot read the .npz archive ({e}).") from e
            arrays = _pick(stored, path)
        elif os.path.isdir(path):
            stored = {os.path.splitext(f)[0]: os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npy")}
            arrays = _pick(stored, path)
        elif path.endswith(".npy"):
            arrays["x_train"] = path
        else:
            raise missing_files(
                name, [path], "give a .npz file, a folder of x_train.npy/y_train.npy files, or an .npy of images."
            )
        arrays.update(given)  # explicit arguments win
    a = {k: _as_array(v, f"{name} {k}") for k, v in arrays.items()}
    if a["x_train"] is None or a["y_train"] is None:
        raise OCLError(f"{name}: need training images and labels (x and y, or a file holding x_train/y_train).")
    if (a["x_test"] is None) != (a["y_test"] is None):
        raise OCLError(f"{name}: x_test and y_test must be given together.")
    where = path or "in-memory arrays"
    sets = {}
    for split in ("train", "test"):
        xs, ys = a[f"x_{split}"], a[f"y_{split}"]
        if xs is None:
            sets[split] = None
            continue
        w = f"{name} ({where}: x_{split}, y_{split})"
        ys = _labels(ys, w)
        if xs.shape[0] != ys.shape[0]:
            raise OCLError(f"{w}: {xs.shape[0]} examples but {ys.shape[0]} labels.")
        sets[split] = ArrayImageSet(_images(xs, w), ys, w)
    if sets["test"] is not None and sets["train"].data.shape[1:] != sets["test"].data.shape[1:]:
        raise OCLError(
            f"{name}: train items have shape {sets['train'].data.shape[1:]} but test items "
            f"{sets['test'].data.shape[1:]}."
        )
    label_map = None
    if classes is None:
        classes, label_map = dense_classes(sets, name)
    return Source(name=name, train=sets["train"], test=sets["test"], classes=classes, label_map=label_map)


def _pick(stored: dict[str, Any], path: str) -> dict[str, Any]:
    """Map stored keys (``x_train``... or ``x``/``y``) onto the four split keys."""
    for xk, yk in _NPZ_KEYS:
        if xk in stored and yk in stored:
            return {
                "x_train": stored[xk], "y_train": stored[yk],
                "x_test": stored.get("x_test"), "y_test": stored.get("y_test"),
            }
    raise OCLError(
        f"{path}: expected keys x_train/y_train (optionally x_test/y_test) or x/y; "
        f"found {sorted(stored) or 'none'}."
    )
