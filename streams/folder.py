"""Image folders: ``root/<class>/*`` or ``root/{train,test}/<class>/*``, decoded lazily.

Discovery uses torchvision's own ``find_classes`` / ``make_dataset`` so the folder
rules match what users know from ``torchvision.datasets.ImageFolder``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np

from ocl.errors import OCLError, storage_error
from ocl.streams.base import ImageSet, Source
from ocl.streams.download import extract_zip, missing_files

log = logging.getLogger(__name__)

_IGNORED_DIRS = {"__MACOSX"}  # junk that macOS zips carry next to the real folders
_SPLIT_DIRS = {"train", "test", "val", "valid", "validation"}  # val folders are ignored


class FileImageSet(ImageSet):
    """Images stored as files, decoded with PIL only when :meth:`get` asks for them.

    Args:
        root: folder the file paths are relative to (kept relative, so moving the data
            set does not change :meth:`fingerprint`).
        files: ``(relative_path, label)`` pairs, in stream order.
        channels: 3 (RGB) or 1 (grayscale, PIL mode ``L``).
        image_size: resize every image to ``image_size x image_size``; if None, every
            image must have the size of the first one.
    """

    def __init__(
        self,
        root: str,
        files: Sequence[tuple[str, int]],
        channels: int = 3,
        image_size: int | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise OCLError(f"{root}: channels must be 1 (grayscale) or 3 (RGB); got {channels}.")
        if image_size is not None and (int(image_size) != image_size or image_size <= 0):
            raise OCLError(f"{root}: stream.image_size must be a positive integer or null; got {image_size!r}.")
        self.root = root
        self.paths = [p for p, _ in files]
        self.labels = np.asarray([y for _, y in files], dtype=np.int64)
        self.channels = channels
        self.image_size = None if image_size is None else int(image_size)
        self._first_size: tuple[int, int] | None = None  # (W, H) of file 0, read on demand

    def _decode(self, i: int):
        from PIL import Image

        path = os.path.join(self.root, self.paths[i])
        try:
            with Image.open(path) as img:
                img.load()  # force decoding here so truncation surfaces as an error now
                img = to_8bit(img, path).convert("RGB" if self.channels == 3 else "L")
        except Image.DecompressionBombError as e:  # not an OSError: it would end in a traceback
            raise OCLError(too_large(path, e)) from e
        except FileNotFoundError as e:
            raise OCLError(gone(path)) from e
        except PermissionError as e:
            raise storage_error(e, path, "reading an image") from e
        except (OSError, ValueError, SyntaxError) as e:  # PIL's ways of saying "bad file"
            raise OCLError(f"{path}: cannot decode image ({e}); the file is corrupt or truncated.") from e
        return path, img

    def _reference_size(self) -> tuple[int, int]:
        if self._first_size is None:
            self._first_size = self._decode(0)[1].size
        return self._first_size

    def get(self, idx: np.ndarray) -> np.ndarray:
        """Decode the files at ``idx`` into ``(len(idx), H, W, C)`` uint8."""
        from PIL import Image

        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if self.image_size is not None:
            w = h = self.image_size
        else:
            w, h = self._reference_size()
        out = np.empty((len(idx), h, w, self.channels), dtype=np.uint8)  # (n, H, W, C)
        for k, i in enumerate(idx):
            path, img = self._decode(int(i))
            if self.image_size is not None:
                if img.size != (w, h):
                    img = img.resize((w, h), Image.Resampling.BILINEAR)
            elif img.size != (w, h):
                first = os.path.join(self.root, self.paths[0])
                raise OCLError(
                    f"{path}: image is {img.size[0]}x{img.size[1]} (WxH) but the first image "
                    f"{first} is {w}x{h}. Set image_size to resize all images to one size."
                )
            arr = np.asarray(img, dtype=np.uint8)
            out[k] = arr if arr.ndim == 3 else arr[..., None]
        return out

    def fingerprint(self) -> str:
        """sha1 over (relative path, size, mtime_ns, label) of every file, plus options.

        Not cached: a file edited after loading must change the key.
        """
        h = hashlib.sha1(f"files|channels={self.channels}|size={self.image_size}".encode())
        for rel, y in zip(self.paths, self.labels.tolist()):
            path = os.path.join(self.root, rel)
            try:
                st = os.stat(path)
            except OSError as e:
                raise OCLError(gone(path)) from e
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{y}\n".encode())
        return h.hexdigest()


#: PIL modes of 16-bit integer images (PNG, TIFF): their values are 0..65535.
_MODES_16BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_8bit(img, path: str):
    """A PIL image with 8 bits per channel. PIL's ``convert`` clips a 16-bit image at 255 (a
    16-bit PNG came out 99.6% white), so 16-bit values are scaled down instead: ``v >> 8``, the
    top 8 bits (0 -> 0, 65535 -> 255, order kept). Mode ``I`` (32-bit integers, how PIL opens
    some 16-bit formats) is scaled the same when its values fit 16 bits; float images are refused.

    Raises:
        OCLError: a mode that has no faithful 8-bit reading here (float, 32-bit values).
    """
    from PIL import Image

    if img.mode in _MODES_16BIT or img.mode == "I":
        a = np.asarray(img)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise OCLError(f"{path}: a 32-bit integer image (PIL mode {img.mode}, values {int(a.min())}.."
                           f"{int(a.max())}); save it with 8 or 16 bits per channel.")
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L")
    if img.mode == "F" or img.mode.startswith("I;"):
        raise OCLError(f"{path}: a {'32-bit float' if img.mode == 'F' else img.mode} image (PIL mode {img.mode}); "
                       "save it as an 8- or 16-bit integer image (PNG, JPEG).")
    return img


def too_large(path: str, e: Exception) -> str:
    """The message for an image PIL refuses to open as a possible decompression bomb (its
    message gives the image's pixels and the limit, twice ``PIL.Image.MAX_IMAGE_PIXELS``)."""
    return f"{path}: too large to decode: {str(e).rstrip('.')}. Resize the file or remove it from the folder."


def gone(path: str) -> str:
    """The message for an image that cannot be found where the folder listing put it."""
    if os.path.islink(path):
        return f"{path}: a dangling symbolic link (to {os.readlink(path)}, which does not exist); remove or fix it."
    return f"{path}: image file disappeared after the folder was listed."


def _class_dirs(directory: str) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(directory)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise storage_error(e, directory, "listing its class folders") from e
    return [c for c in classes if not c.startswith(".") and c not in _IGNORED_DIRS]


def _walk(directory: str, seen: dict[str, str], keep: Callable[[str], bool],
          above: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """``(folder, file names)`` of every folder under ``directory``, following symbolic links as
    ``os.walk(followlinks=True)`` (torchvision's ``make_dataset``) does, but refusing what it
    gets wrong: a link cycle (``cyc -> .``, ``x/up -> ..``; os.walk loops until the path is
    too long: 10 images became 410, or hung), a folder reached twice (its images would be
    streamed twice, under two labels), a dangling link, and a folder that cannot be listed
    (os.walk skips it silently: its class would look empty).

    Args:
        directory: the folder to walk.
        seen: real path -> path of every folder walked so far (shared by the class folders of
            one split); updated.
        keep: which file paths to list (the others are not looked at).
        above: real paths of the folders above ``directory`` (a link to one is a cycle).
    """
    out: list[tuple[str, list[str]]] = []
    stack = [(directory, (*above, os.path.realpath(directory)))]
    while stack:
        folder, chain = stack.pop()
        real = chain[-1]
        if real in seen:
            if real in chain[:-1]:
                raise OCLError(f"{folder}: a symbolic link cycle ({folder} is {seen[real]}, a folder above it); "
                               "remove the link.")
            raise OCLError(f"{folder} and {seen[real]} are the same folder (through a symbolic link): its images "
                           "would be streamed twice, under two labels or paths; remove the link.")
        seen[real] = folder
        names: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():  # follows links
                        sub = os.path.join(folder, entry.name)
                        stack.append((sub, (*chain, os.path.realpath(sub))))
                    elif keep(entry.path):
                        if entry.is_symlink() and not os.path.exists(entry.path):
                            raise OCLError(gone(entry.path))
                        names.append(entry.name)
        except OSError as e:
            raise storage_error(e, e.filename or folder, "listing the images of a class folder") from e
        out.append((folder, names))
    return out


def _list_files(directory: str, classes: list[str]) -> list[tuple[str, int]]:
    """``(path relative to directory, class index)`` for every image under ``directory/<class>``,
    in torchvision's ``make_dataset`` order (class names sorted, then ``sorted(os.walk(...))``,
    file names sorted; then a stable sort by class index), which the fingerprint depends on."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    def valid(path: str) -> bool:
        rel = os.path.relpath(path, directory)
        hidden = any(part.startswith(".") for part in rel.split(os.sep))  # e.g. ._x.jpg, .ipynb_checkpoints
        return not hidden and has_file_allowed_extension(path, IMG_EXTENSIONS)

    present = set(_class_dirs(directory))
    class_to_idx = {c: i for i, c in enumerate(classes) if c in present}
    if not class_to_idx:
        return []
    top = os.path.realpath(directory)
    seen = {top: directory}  # a link back to the split folder is a cycle too
    samples: list[tuple[str, int]] = []
    for c in sorted(class_to_idx):
        for folder, names in sorted(_walk(os.path.join(directory, c), seen, valid, (top,))):
            samples += [(os.path.join(folder, n), class_to_idx[c]) for n in sorted(names)]
    samples.sort(key=lambda s: s[1])  # stable: class index order, files sorted within a class
    return [(os.path.relpath(p, directory), y) for p, y in samples]


def _is_split_layout(root: str) -> bool:
    dirs = set(_class_dirs(root))
    return "train" in dirs and dirs <= _SPLIT_DIRS


def load_imagefolder(
    root: str,
    image_size: int | None = None,
    channels: int = 3,
    name: str | None = None,
    class_order: list[str] | None = None,
) -> Source:
    """Load ``root/<class>/*`` (no test split) or ``root/train/<class>/*`` + ``root/test/<class>/*``.

    Images decode lazily to ``(n, H, W, channels)`` uint8. ``root`` may also be a
    ``.zip`` of either layout (extracted once, see :func:`extract_zip`).

    Args:
        root: the data set folder (or zip).
        image_size: resize to a square of this side; None keeps the native size, which
            must then be the same for all images.
        channels: 3 for RGB, 1 for grayscale.
        name: source name; defaults to the folder name.
        class_order: class names in label order; default is the sorted folder names.
            Every class folder must appear in it.
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    if root.lower().endswith(".zip"):
        name = name or os.path.splitext(os.path.basename(root))[0]
        root = extract_zip(root)
    if not os.path.isdir(root):
        raise missing_files(
            f"{name or 'image folder'} (stream.root={root})",
            [os.path.join(root, "<class>", "<image>"), os.path.join(root, "train", "<class>", "<image>")],
            "point root at a folder with one sub-folder per class (optionally under train/ and test/).",
        )
    name = name or os.path.basename(root.rstrip(os.sep))
    split = _is_split_layout(root)
    train_dir = os.path.join(root, "train") if split else root
    test_dir = os.path.join(root, "test") if split else None

    found = _class_dirs(train_dir)
    if class_order is None:
        classes = found
    else:
        classes = [str(c) for c in class_order]
        if len(set(classes)) != len(classes):
            raise OCLError(f"{name}: class_order lists a class twice: {classes}.")
    if not found:
        raise OCLError(f"{train_dir}: no class folders found; expected {train_dir}/<class>/<image>.")
    for d in (train_dir, test_dir):
        extra = [c for c in (_class_dirs(d) if d and os.path.isdir(d) else []) if c not in classes]
        if extra:
            raise OCLError(
                f"{d}: class folders {extra} are not in class_order {classes}. "
                "Add them to class_order or remove the folders."
            )

    train_files = _list_files(train_dir, classes)
    if not train_files:
        raise OCLError(
            f"{train_dir}: no image files found (extensions: jpg, jpeg, png, ppm, bmp, pgm, tif, tiff, webp)."
        )
    counts = np.bincount([y for _, y in train_files], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        log.warning("%s: no training images for classes %s", name, empty)
    train = FileImageSet(train_dir, train_files, channels, image_size)

    test = None
    if test_dir is not None and os.path.isdir(test_dir):
        test_files = _list_files(test_dir, classes)
        if test_files:
            test = FileImageSet(test_dir, test_files, channels, image_size)
        else:
            log.warning("%s: %s holds no images; no test split", name, test_dir)
    log.info("%s: %d train / %s test images, %d classes", name, len(train), len(test) if test else 0, len(classes))
    return Source(name=name, train=train, test=test, classes=classes)
