import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from ocl.errors import OCLError
from ocl.streams.folder import FileImageSet, load_imagefolder


def _img(value, size=(6, 4)):
    """An RGB image (W, H) = size whose top-left pixel is marked, so orientation is checkable."""
    w, h = size
    a = np.full((h, w, 3), value, np.uint8)
    a[0, 0] = (255, 0, 0)
    return a


def _write(path, arr, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def _flat(root, classes=("cat", "dog"), per=2, size=(6, 4)):
    for ci, c in enumerate(classes):
        for k in range(per):
            _write(root / c / f"{k}.png", _img(10 * ci + k, size))
    return root


def test_flat_layout_shapes_labels_pixels(tmp_path):
    src = load_imagefolder(str(_flat(tmp_path / "pets")))
    assert src.name == "pets" and src.classes == ["cat", "dog"] and src.test is None
    assert src.train.labels.tolist() == [0, 0, 1, 1]
    x = src.train.get(np.arange(4))
    assert x.shape == (4, 4, 6, 3) and x.dtype == np.uint8  # (n, H, W, C)
    assert x[2, 1, 1, 0] == 10 and tuple(x[2, 0, 0]) == (255, 0, 0)  # PNG is lossless
    assert src.train.get(np.array([], dtype=int)).shape == (0, 4, 6, 3)


def test_split_layout_and_class_order(tmp_path):
    _flat(tmp_path / "train", ("a", "b", "c"))
    _flat(tmp_path / "test", ("c", "a"), per=1)
    src = load_imagefolder(str(tmp_path), class_order=["c", "b", "a"], name="abc")
    assert src.classes == ["c", "b", "a"]
    assert sorted(set(src.train.labels.tolist())) == [0, 1, 2]
    paths = dict(zip(src.train.paths, src.train.labels.tolist()))
    assert paths[os.path.join("c", "0.png")] == 0 and paths[os.path.join("a", "1.png")] == 2
    assert len(src.test) == 2 and sorted(src.test.labels.tolist()) == [0, 2]


def test_grayscale_resize_and_jpeg(tmp_path):
    root = tmp_path / "g"
    _write(root / "x" / "a.jpg", _img(100, (10, 7)), "JPEG")
    _write(root / "y" / "b.jpeg", _img(200, (5, 9)), "JPEG")
    src = load_imagefolder(str(root), image_size=8, channels=1)
    x = src.train.get(np.array([0, 1]))
    assert x.shape == (2, 8, 8, 1)
    assert abs(int(x[1, 4, 4, 0]) - 200) < 10


def test_hidden_and_non_image_files_ignored(tmp_path):
    root = _flat(tmp_path / "d")
    (root / "cat" / "._0.png").write_bytes(b"macos junk")
    (root / "cat" / "notes.txt").write_text("hi")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "__MACOSX").mkdir()
    src = load_imagefolder(str(root))
    assert src.classes == ["cat", "dog"] and len(src.train) == 4


def test_size_mismatch_names_file(tmp_path):
    root = _flat(tmp_path / "d")
    _write(root / "dog" / "big.png", _img(3, (7, 7)))
    src = load_imagefolder(str(root))
    with pytest.raises(OCLError) as e:
        src.train.get(np.arange(len(src.train)))
    msg = str(e.value)
    assert "big.png" in msg and "7x7" in msg and "6x4" in msg and "image_size" in msg


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_names_file(tmp_path, kind):
    root = _flat(tmp_path / "d")
    bad = root / "dog" / "zz.jpg"
    if kind == "garbage":
        bad.write_bytes(b"not an image at all")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(bad, "JPEG")
        bad.write_bytes(bad.read_bytes()[:300])
    src = load_imagefolder(str(root))
    i = src.train.paths.index(os.path.join("dog", "zz.jpg"))
    with pytest.raises(OCLError, match="zz.jpg"):
        src.train.get(np.array([i]))


def test_fingerprint(tmp_path):
    root = _flat(tmp_path / "d")
    fp = load_imagefolder(str(root)).train.fingerprint()
    assert load_imagefolder(str(root)).train.fingerprint() == fp  # stable
    assert load_imagefolder(str(root), image_size=4).train.fingerprint() != fp
    assert load_imagefolder(str(root), channels=1).train.fingerprint() != fp
    assert load_imagefolder(str(root), class_order=["dog", "cat"]).train.fingerprint() != fp
    _write(root / "cat" / "1.png", _img(99, (6, 4)) * 0 + np.arange(6, dtype=np.uint8)[None, :, None])
    assert load_imagefolder(str(root)).train.fingerprint() != fp


def test_fingerprint_changes_on_touch(tmp_path):
    root = _flat(tmp_path / "d")
    s = load_imagefolder(str(root)).train
    fp = s.fingerprint()
    st = os.stat(root / "dog" / "0.png")
    os.utime(root / "dog" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert s.fingerprint() != fp  # not cached: edits after loading count


def test_missing_root_and_empty(tmp_path):
    with pytest.raises(OCLError) as e:
        load_imagefolder(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(OCLError, match="no image files"):
        load_imagefolder(str(tmp_path / "empty"))


def test_unknown_class_folder(tmp_path):
    root = _flat(tmp_path / "d", ("cat", "dog", "eel"))
    with pytest.raises(OCLError, match="eel"):
        load_imagefolder(str(root), class_order=["cat", "dog"])


def test_bad_options(tmp_path):
    root = _flat(tmp_path / "d")
    with pytest.raises(OCLError, match="channels"):
        load_imagefolder(str(root), channels=4)
    with pytest.raises(OCLError, match="image_size"):
        FileImageSet(str(root), [("cat/0.png", 0)], image_size=0)


def test_zip_of_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OCL_EXTRACT_DIR", str(tmp_path / "unpacked"))
    root = _flat(tmp_path / "src", per=1)
    z = tmp_path / "pets.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, os.path.join("train", os.path.relpath(p, root)))
    src = load_imagefolder(str(z))
    assert src.name == "pets" and src.classes == ["cat", "dog"] and len(src.train) == 2
    assert src.train.get(np.array([1])).shape == (1, 4, 6, 3)
    assert sorted(os.listdir(tmp_path)) == ["pets.zip", "src", "unpacked"]  # nothing beside the zip


# ------------------------------------------------------------------------ symbolic links, bit depth, huge headers

def _five_each(root):
    for c in "xy":
        for k in range(5):
            _write(root / c / f"{k}.png", _img(40 * k))
    return root


@pytest.mark.parametrize("links,expect", [
    ({"cyc": "."}, "cyc: a symbolic link cycle"),  # used to hang (with x/up) or add a class "cyc"
    ({"x/up": ".."}, "x/up: a symbolic link cycle"),  # used to stream 410 images, y's labelled x
    ({"x/yy": "../y"}, "are the same folder (through a symbolic link)"),  # y's images twice, once as x
])
def test_symbolic_link_cycles_and_repeats_are_refused(tmp_path, links, expect):
    root = _five_each(tmp_path / "d")
    for link, target in links.items():
        os.symlink(target, root / link)
    with pytest.raises(OCLError, match="remove the link") as e:
        load_imagefolder(str(root))
    assert expect in str(e.value)


def test_both_cycles_at_once_do_not_hang(tmp_path):
    root = _five_each(tmp_path / "d")
    os.symlink(".", root / "cyc")
    os.symlink("..", root / "x" / "up")
    with pytest.raises(OCLError, match="symbolic link cycle"):
        load_imagefolder(str(root))


def test_linked_class_folder_and_linked_file_are_followed(tmp_path):
    elsewhere = _five_each(tmp_path / "elsewhere")
    root = tmp_path / "d"
    root.mkdir()
    os.symlink(elsewhere / "x", root / "x")
    (root / "y").mkdir()
    os.symlink(elsewhere / "y" / "0.png", root / "y" / "0.png")
    src = load_imagefolder(str(root))
    assert src.classes == ["x", "y"] and src.train.labels.tolist() == [0] * 5 + [1]


def test_dangling_link_is_named_as_such(tmp_path):
    root = _five_each(tmp_path / "d")
    os.symlink(tmp_path / "nowhere.png", root / "y" / "9.png")
    with pytest.raises(OCLError, match=r"y/9.png: a dangling symbolic link \(to .*nowhere.png, which does not exist\)"):
        load_imagefolder(str(root))
    os.remove(root / "y" / "9.png")
    (root / "notes.txt").symlink_to(tmp_path / "nowhere.txt")  # not an image: not listed, not refused
    src = load_imagefolder(str(root))
    os.symlink(tmp_path / "gone.png", root / "y" / "late.png")  # a link that dangles after listing
    src = FileImageSet(str(root), [("y/late.png", 0)])
    with pytest.raises(OCLError, match="late.png: a dangling symbolic link"):
        src.get(np.array([0]))


def test_16_bit_grayscale_images_are_scaled_not_saturated(tmp_path):
    """PIL's convert clipped 16-bit values at 255: 99.6% of pixels came out white."""
    root = tmp_path / "g16"
    rng = np.random.default_rng(0)
    for c, level in (("dark", 10_000), ("bright", 50_000)):
        for k in range(3):
            a = (level + rng.integers(-2000, 2000, (8, 8))).astype(np.uint16)
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / c / f"{k}.png")
    for channels in (1, 3):
        src = load_imagefolder(str(root), channels=channels)
        x = src.train.get(np.arange(len(src.train))).astype(int)
        bright, dark = x[src.train.labels == 0], x[src.train.labels == 1]  # classes sorted: bright, dark
        assert (x < 255).mean() > 0.99  # not saturated
        assert abs(dark.mean() - 10_000 / 256) < 3 and abs(bright.mean() - 50_000 / 256) < 3
        assert dark.max() < bright.min()  # the order of brightness is kept


def test_float_image_is_refused(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.ones((4, 4), np.float32)).save(root / "a" / "0.tif")
    src = load_imagefolder(str(root))
    with pytest.raises(OCLError, match="0.tif: a 32-bit float image"):
        src.train.get(np.array([0]))


def test_image_whose_header_claims_a_huge_size_is_refused_by_name(tmp_path):
    """A PNG header saying 20000x20000 ended in PIL's DecompressionBombError traceback."""
    import struct
    import zlib

    root = tmp_path / "big"
    (root / "a").mkdir(parents=True)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    (root / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    src = load_imagefolder(str(root))
    with pytest.raises(OCLError) as e:
        src.train.get(np.array([0]))
    msg = str(e.value)
    assert "0.png: too large to decode: Image size (400000000 pixels) exceeds limit of" in msg
    assert "Resize the file or remove it" in msg
