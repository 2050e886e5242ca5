"""EMNIST from the official IDX files (plain or gzip) or the common CSV layout.

EMNIST stores every 28x28 image transposed; both readers transpose back so that
letters and digits are upright. The ``letters`` split labels 1..26 in both formats;
they are shifted to 0..25 with classes ``a``..``z``.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import zlib

import numpy as np

from ocl.errors import OCLError, storage_error
from ocl.streams.base import ArrayImageSet, Source
from ocl.streams.download import DEFAULT_ROOT, fetch, missing_files

log = logging.getLogger(__name__)

SPLITS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")
_FORMATS = ("auto", "idx", "csv")
_HOST = "biometrics.nist.gov"  # where torchvision's EMNIST downloads from
# IDX type byte -> numpy dtype (big-endian), from the format's definition.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CSV_CHUNK = 8192  # rows parsed at once: bounds memory on the 700k-row byclass files


def emnist_classes(split: str) -> list[str]:
    """Class names of ``split`` in label order (torchvision's, minus letters' 'N/A')."""
    from torchvision.datasets.mnist import EMNIST

    classes = list(EMNIST.classes_split_dict[split])
    return classes[1:] if split == "letters" else classes


def _label_offset(split: str) -> int:
    return 1 if split == "letters" else 0  # letters files label a..z as 1..26


# ----------------------------------------------------------------------------- IDX


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) with exactly ``ndim`` dimensions."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise missing_files("emnist", [path], "put the IDX file there.") from e
    except OSError as e:
        raise storage_error(e, path, "reading the EMNIST IDX file") from e
    try:
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise OCLError(f"{path}: cannot decompress ({e}); the gzip file is corrupt or truncated.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise OCLError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}).")
    if raw[3] != ndim:
        raise OCLError(f"{path}: IDX file has {raw[3]} dimensions; expected {ndim}.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise OCLError(f"{path}: file is truncated inside its header.")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != need:
        what = "truncated" if len(raw) - header < need else "longer than its header says"
        raise OCLError(
            f"{path}: file is {what}: header says {dims} ({need} bytes of data), found {len(raw) - header}."
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_names(split: str, part: str) -> tuple[str, str]:
    p = f"emnist-{split}-{part}"
    return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"


def _find(dirs: list[str], name: str, exts: tuple[str, ...]) -> str | None:
    for d in dirs:
        for ext in exts:
            if os.path.isfile(os.path.join(d, name + ext)):
                return os.path.join(d, name + ext)
    return None


def _find_idx(dirs: list[str], split: str) -> dict[str, tuple[str | None, str | None]]:
    return {
        part: tuple(_find(dirs, n, ("", ".gz")) for n in _idx_names(split, part))  # type: ignore[misc]
        for part in ("train", "test")
    }


def _idx_set(images: str, labels: str, split: str, num_classes: int) -> ArrayImageSet:
    x = read_idx(images, 3)  # (n, W, H): stored transposed
    y = read_idx(labels, 1).astype(np.int64)
    if x.shape[0] != y.shape[0]:
        raise OCLError(f"{images} holds {x.shape[0]} images but {labels} holds {y.shape[0]} labels.")
    if x.dtype != np.uint8:
        raise OCLError(f"{images}: EMNIST images must be unsigned bytes (IDX type 0x08); got {x.dtype}.")
    y = _shift_labels(y, split, num_classes, labels, lambda k: f"index {k}")
    return ArrayImageSet(np.ascontiguousarray(x.transpose(0, 2, 1)).astype(np.uint8), y, images)


def _shift_labels(y: np.ndarray, split: str, num_classes: int, path: str, where) -> np.ndarray:
    """Check raw labels and shift letters' 1..26 to 0..25; ``where(k)`` names item ``k``."""
    lo = _label_offset(split)
    bad = np.flatnonzero((y < lo) | (y >= lo + num_classes))
    if bad.size:
        raise OCLError(
            f"{path}: label {int(y[bad[0]])} at {where(int(bad[0]))} is outside "
            f"{lo}..{lo + num_classes - 1} for EMNIST {split}."
        )
    return y - lo


# ----------------------------------------------------------------------------- CSV


def _short(text: str, limit: int = 40) -> str:
    """A cell as quoted in a message: never more than ``limit`` characters of a file's bytes."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _parse_rows(lines: list[str], path: str, rownums: list[int]) -> np.ndarray:
    """Parse CSV lines into ``(n, 785)`` float64; on failure find and name the bad row."""
    try:
        rows = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2)
        if rows.shape[1] == 785:
            return rows
    except ValueError:
        pass
    for num, line in zip(rownums, lines):  # slow path, only to name the offending row
        cells = line.strip().split(",")
        if len(cells) != 785:
            raise OCLError(
                f"{path}: row {num} has {len(cells)} values; expected 785 (label then 28x28 pixels)."
            )
        for col, cell in enumerate(cells):
            if not _is_number(cell):
                what = "its label" if col == 0 else f"pixel {col}"
                raise OCLError(f"{path}: row {num}: {what} is {_short(cell)}, not a number.")
    raise OCLError(f"{path}: rows {rownums[0]}..{rownums[-1]} cannot be parsed as numbers.")


def _is_number(cell: str) -> bool:
    try:
        float(cell.strip().strip('"'))
        return True
    except ValueError:
        return False


def _is_header(line: str) -> bool:
    """A header names its columns: every cell is a non-numeric name (``label,p0,p1,...``). A
    row with numbers in it is data, even if its label is damaged (then it is an error that
    names the row, not a silently skipped row)."""
    cells = line.strip().split(",")
    return all(c.strip().strip('"') and not _is_number(c) for c in cells)


def read_emnist_csv(path: str, split: str, num_classes: int) -> ArrayImageSet:
    """Read label-first CSV rows into ``(n, 28, 28, 1)`` uint8 upright images and 0-based labels.

    Rows in errors are 1-based line numbers. A first line of names only (``label,p0,...``) is
    a header; any other line must be numbers.
    """
    xs, ys = [], []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError as e:
        raise missing_files(f"emnist-{split}", [path], "check the CSV path (train_file / test_file).") from e
    except OSError as e:
        raise storage_error(e, path, "reading the EMNIST CSV") from e
    row = 0
    with f:
        def numbered():  # non-empty lines with their 1-based line numbers
            nonlocal row
            for row, ln in enumerate(f, start=1):
                if ln.strip():
                    yield row, ln

        try:
            lines = numbered()
            first = next(lines, None)
            rows_it = itertools.chain([first] if first and not _is_header(first[1]) else [], lines)
            while chunk := list(itertools.islice(rows_it, _CSV_CHUNK)):
                nums = [i for i, _ in chunk]
                rows = _parse_rows([ln for _, ln in chunk], path, nums)
                labels, pixels = rows[:, 0], rows[:, 1:]
                if not np.all(labels == np.round(labels)):
                    k = int(np.flatnonzero(labels != np.round(labels))[0])
                    raise OCLError(f"{path}: row {nums[k]} has a non-integer label {labels[k]}.")
                badpix = (pixels < 0) | (pixels > 255) | (pixels != np.round(pixels))
                if badpix.any():
                    k = int(np.flatnonzero(badpix.any(axis=1))[0])
                    raise OCLError(f"{path}: row {nums[k]} has pixel values outside the integers 0..255.")
                where = lambda k, nums=nums: f"row {nums[k]}"  # noqa: E731
                ys.append(_shift_labels(labels.astype(np.int64), split, num_classes, path, where))
                xs.append(pixels.astype(np.uint8).reshape(-1, 28, 28).transpose(0, 2, 1))  # undo EMNIST's transpose
        except UnicodeDecodeError:
            raise OCLError(f"{path}: not a text file (bytes that are not UTF-8 text in line {row + 1}); an EMNIST "
                           "CSV holds rows of numbers: a label, then 784 pixel values.") from None
        except OSError as e:
            raise storage_error(e, path, "reading the EMNIST CSV") from e
    if not ys:
        raise OCLError(f"{path}: no data rows.")
    return ArrayImageSet(np.concatenate(xs), np.concatenate(ys), path)


# ----------------------------------------------------------------------------- entry point


def _explicit_set(path: str, format: str, split: str, num_classes: int) -> ArrayImageSet:
    """A file named by train_file/test_file: a CSV, or an IDX images file whose labels file
    has the same name with ``labels-idx1`` in place of ``images-idx3``."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    fmt = format if format != "auto" else ("csv" if path.lower().endswith(".csv") else "idx")
    if fmt == "csv":
        return read_emnist_csv(path, split, num_classes)
    base = os.path.basename(path)
    if "images-idx3" not in base:
        raise OCLError(
            f"{path}: an IDX train_file/test_file must be the images file (its name holds "
            "'images-idx3'); the labels file is found by replacing that with 'labels-idx1'."
        )
    labels = os.path.join(os.path.dirname(path), base.replace("images-idx3", "labels-idx1"))
    return _idx_set(path, labels, split, num_classes)


def load_emnist(
    root: str = DEFAULT_ROOT,
    split: str = "letters",
    format: str = "auto",
    train_file: str | None = None,
    test_file: str | None = None,
    download: bool = True,
) -> Source:
    """Load an EMNIST split as ``(n, 28, 28, 1)`` uint8 upright images.

    Args:
        root: folder searched for files in ``root/EMNIST/raw``, ``root/raw`` and ``root``
            (torchvision's layout); downloads go to ``root/EMNIST/raw``.
        split: balanced, byclass, bymerge, digits, letters or mnist.
        format: ``"idx"`` (official files ``emnist-<split>-<train|test>-<images-idx3|labels-idx1>-ubyte[.gz]``),
            ``"csv"`` (``emnist-<split>-train.csv`` / ``-test.csv``, label then 784 pixels),
            or ``"auto"``.
        train_file, test_file: explicit files (then ``root`` is not searched): CSVs, or IDX
            images files with their ``labels-idx1`` twins beside them.
        download: fetch the official IDX files with torchvision if nothing is found.
    """
    if split not in SPLITS:
        raise OCLError(f"emnist: split must be one of {SPLITS}; got {split!r}.")
    if format not in _FORMATS:
        raise OCLError(f"emnist: format must be one of {_FORMATS}; got {format!r}.")
    name = f"emnist-{split}"
    classes = emnist_classes(split)
    k = len(classes)
    if train_file or test_file:
        if not train_file:
            raise OCLError(f"{name}: test_file was given without train_file.")
        train = _explicit_set(train_file, format, split, k)
        test = _explicit_set(test_file, format, split, k) if test_file else None
        return Source(name=name, train=train, test=test, classes=classes)

    root = os.path.abspath(os.path.expanduser(str(root)))
    dirs = [os.path.join(root, "EMNIST", "raw"), os.path.join(root, "raw"), root]
    raw = dirs[0]
    idx_expected = [os.path.join(raw, n) + "[.gz]" for p in ("train", "test") for n in _idx_names(split, p)]
    csv_expected = [os.path.join(root, f"emnist-{split}-{p}.csv") for p in ("train", "test")]
    hint = (
        f"put the official IDX files in {raw} (or {root}), or CSV files emnist-{split}-train.csv/"
        f"-test.csv in {root} (stream.root sets this folder), or name the files with "
        "train_file=/test_file= (config keys stream.train_file / stream.test_file)"
    )

    def idx_source() -> Source | None:
        found = _find_idx(dirs, split)
        have = [p for pair in found.values() for p in pair if p]
        if not have:
            return None
        if len(have) < 4:
            flat = [p for part in ("train", "test") for p in found[part]]  # same order as idx_expected
            missing = [e for e, p in zip(idx_expected, flat) if p is None]
            raise missing_files(name, missing, f"found only {have}; all four IDX files are needed. " + hint)
        sets = {p: _idx_set(*found[p], split=split, num_classes=k) for p in ("train", "test")}  # type: ignore[misc]
        return Source(name=name, train=sets["train"], test=sets["test"], classes=classes)

    def csv_source() -> Source | None:
        tr = _find(dirs, f"emnist-{split}-train", (".csv",))
        if tr is None:
            return None
        te = _find(dirs, f"emnist-{split}-test", (".csv",))
        if te is None:
            log.warning("%s: no %s; no test split", name, csv_expected[1])
        return Source(
            name=name, train=read_emnist_csv(tr, split, k),
            test=read_emnist_csv(te, split, k) if te else None, classes=classes,
        )

    for fmt, make in (("idx", idx_source), ("csv", csv_source)):
        if format in ("auto", fmt):
            src = make()
            if src is not None:
                log.info("%s: %s format under %s", name, fmt, root)
                return src
    if format == "csv":
        raise missing_files(name, csv_expected, hint + " (download only fetches the IDX format).")
    expected = idx_expected + (csv_expected if format == "auto" else [])
    from torchvision.datasets import EMNIST

    fetch(name, _HOST, lambda: EMNIST(root, split=split, train=False, download=True), expected, hint, download)
    src = idx_source()
    if src is None:
        raise missing_files(name, expected, hint)
    return src
