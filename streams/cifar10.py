"""CIFAR-10 from the official python pickles, an image folder, or a zip of either."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np

from ocl.errors import OCLError
from ocl.streams.base import ArrayImageSet, Source
from ocl.streams.download import extract_zip, fetch, missing_files
from ocl.streams.folder import _class_dirs, load_imagefolder

log = logging.getLogger(__name__)

#: Official label order (``batches.meta``); image-folder class indices follow it too.
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
PICKLE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
_HOST = "www.cs.toronto.edu"  # where torchvision's CIFAR10 downloads from
_LAYOUTS = ("auto", "pickle", "imagefolder")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a data file cannot run code."""

    _NUMPY = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"}

    def find_class(self, module: str, name: str):
        if (module.split(".")[0] == "numpy" and name in self._NUMPY) or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch file")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as e:
        hint = "the pickle folder is incomplete; re-extract cifar-10-python.tar.gz."
        raise missing_files("cifar10", [path], hint) from e
    except Exception as e:  # truncated/corrupt pickles raise many types (EOFError, UnpicklingError, ...)
        raise OCLError(
            f"{path}: cannot read CIFAR-10 batch ({type(e).__name__}: {e}); the file is corrupt or truncated."
        ) from e
    if not isinstance(d, dict):
        raise OCLError(f"{path}: expected a pickled dict, got {type(d).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> images ``(n, 32, 32, 3)`` uint8 and labels ``(n,)`` int64."""
    d = _unpickle(path)
    if "data" not in d or "labels" not in d:
        raise OCLError(f"{path}: CIFAR-10 batch must hold 'data' and 'labels'; found keys {sorted(d)}.")
    data, labels = np.asarray(d["data"]), np.asarray(d["labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise OCLError(f"{path}: 'data' must have shape (n, 3072); got {tuple(data.shape)}.")
    if labels.shape != (data.shape[0],):
        raise OCLError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images.")
    bad = np.flatnonzero((labels < 0) | (labels >= 10))
    if bad.size:
        raise OCLError(f"{path}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside 0..9.")
    # Rows are channel-major (R plane, G plane, B plane, each row-major 32x32).
    x = np.ascontiguousarray(data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, labels.astype(np.int64)


def _load_pickles(folder: str) -> Source:
    paths = [os.path.join(folder, f) for f in TRAIN_BATCHES + [TEST_BATCH]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise missing_files(
            "cifar10", missing,
            f"{folder} is incomplete; re-extract the official cifar-10-python.tar.gz there "
            "(or delete the folder and load with download=True).",
        )
    meta = os.path.join(folder, META)
    if os.path.isfile(meta):
        names = _unpickle(meta).get("label_names")
        if names is not None and [n.decode() if isinstance(n, bytes) else n for n in names] != CIFAR10_CLASSES:
            raise OCLError(f"{meta}: label_names {list(names)} differ from CIFAR-10's {CIFAR10_CLASSES}.")
    parts = [_read_batch(p) for p in paths[:-1]]
    x_test, y_test = _read_batch(paths[-1])
    train = ArrayImageSet(np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), folder)
    test = ArrayImageSet(x_test, y_test, paths[-1])
    return Source(name="cifar10", train=train, test=test, classes=CIFAR10_CLASSES)


def _load_folder(root: str) -> Source:
    found = _class_dirs(os.path.join(root, "train"))
    if set(found) != set(CIFAR10_CLASSES):
        raise OCLError(
            f"{root}/train: class folders must be exactly the CIFAR-10 classes {CIFAR10_CLASSES}; "
            f"unexpected {sorted(set(found) - set(CIFAR10_CLASSES))}, "
            f"missing {[c for c in CIFAR10_CLASSES if c not in found]}."
        )
    return load_imagefolder(root, name="cifar10", class_order=CIFAR10_CLASSES)


def _detect(root: str, layout: str) -> tuple[str, str] | None:
    """Return ``(layout, folder)`` for the first layout found under ``root``."""
    candidates = [root]
    subdirs = _class_dirs(root) if os.path.isdir(root) else []
    if len(subdirs) == 1:  # e.g. a zip whose contents sit in one top-level folder
        candidates.append(os.path.join(root, subdirs[0]))
    for d in candidates:
        if layout in ("auto", "pickle"):
            for p in (os.path.join(d, PICKLE_DIR), d):
                if any(os.path.isfile(os.path.join(p, f)) for f in (TRAIN_BATCHES[0], TEST_BATCH)):
                    return "pickle", p
        if layout in ("auto", "imagefolder") and os.path.isdir(os.path.join(d, "train")):
            return "imagefolder", d
    return None


def _expected(root: str, layout: str) -> list[str]:
    out = []
    if layout in ("auto", "pickle"):
        out += [os.path.join(root, PICKLE_DIR, f) for f in TRAIN_BATCHES + [TEST_BATCH, META]]
    if layout in ("auto", "imagefolder"):
        out += [os.path.join(root, s, "<class>", "*.jpg|png") for s in ("train", "test")]
    return out


def load_cifar10(root: str, layout: str = "auto", download: bool = True) -> Source:
    """Load CIFAR-10: 50,000 train + 10,000 test images ``(n, 32, 32, 3)`` uint8, 10 classes.

    Args:
        root: a folder holding ``cifar-10-batches-py/`` (or that folder itself), a folder
            with ``train/<class>/`` and ``test/<class>/`` images, or a ``.zip`` of either.
        layout: ``"pickle"``, ``"imagefolder"`` or ``"auto"`` (detect).
        download: fetch the official pickles with torchvision if nothing is found.

    Labels follow the official order (airplane=0 ... truck=9) in both layouts. Pickle
    data is held in memory; image files are decoded lazily.
    """
    if layout not in _LAYOUTS:
        raise OCLError(f"cifar10: layout must be one of {_LAYOUTS}; got {layout!r}.")
    root = os.path.abspath(os.path.expanduser(str(root)))
    zipped = root.lower().endswith(".zip")
    if zipped:
        if not os.path.isfile(root):
            raise missing_files("cifar10", [root], "check the path of the zip (stream root).")
        root = extract_zip(root)
    hint = (
        f"put the official python pickles (cifar-10-python.tar.gz, extracted) or an image folder "
        f"train/<class>/, test/<class>/ with classes {', '.join(CIFAR10_CLASSES)} under {root}, "
        "or set stream.root (root=) to the folder or .zip that holds them"
    )
    found = _detect(root, layout)
    if found is None:
        if zipped:
            raise OCLError(f"cifar10: the zip extracted to {root} holds neither layout. Expected:\n  "
                           + "\n  ".join(_expected(root, layout)))
        if layout == "imagefolder":
            raise missing_files("cifar10", _expected(root, layout),
                                hint + " (download only fetches the pickle layout; use layout='auto').")
        from torchvision.datasets import CIFAR10

        fetch("cifar10", _HOST, lambda: CIFAR10(root, train=False, download=True),
              _expected(root, layout), hint, download)
        found = _detect(root, "pickle")
        if found is None:
            raise missing_files("cifar10", _expected(root, "pickle"), hint)
    kind, folder = found
    log.info("cifar10: %s layout in %s", kind, folder)
    return _load_pickles(folder) if kind == "pickle" else _load_folder(folder)
