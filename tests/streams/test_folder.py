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


def test_zip_of_folder(tmp_path):
    root = _flat(tmp_path / "src", per=1)
    z = tmp_path / "pets.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, os.path.join("train", os.path.relpath(p, root)))
    src = load_imagefolder(str(z))
    assert src.name == "pets" and src.classes == ["cat", "dog"] and len(src.train) == 2
    assert src.train.get(np.array([1])).shape == (1, 4, 6, 3)
