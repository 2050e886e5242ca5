import gzip
import os
import struct

import numpy as np
import pytest

from ocl.errors import OCLError
from ocl.streams import download
from ocl.streams.emnist import load_emnist, read_idx


def _upright(n, seed=0):
    """Upright 28x28 images with a mark in the top-left corner only (rows 0-2, cols 0-9)."""
    x = np.random.default_rng(seed).integers(0, 50, (n, 28, 28), dtype=np.uint8)
    x[:, 0:3, 0:10] = 255
    return x


def _idx_bytes(arr, magic):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def _write_idx(folder, split, part, upright, labels, gz=True):
    """Write official EMNIST IDX files: images stored transposed, as NIST ships them."""
    os.makedirs(folder, exist_ok=True)
    stored = np.ascontiguousarray(upright.transpose(0, 2, 1))
    files = {}
    for kind, arr, magic in (("images-idx3", stored, 0x803), ("labels-idx1", np.asarray(labels, np.uint8), 0x801)):
        path = os.path.join(folder, f"emnist-{split}-{part}-{kind}-ubyte" + (".gz" if gz else ""))
        data = _idx_bytes(arr, magic)
        with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
            f.write(data)
        files[kind] = path
    return files


def _write_all_idx(root, split="letters", gz=True, sub=("EMNIST", "raw")):
    folder = os.path.join(root, *sub)
    lo = 1 if split == "letters" else 0
    x, xt = _upright(6), _upright(3, 1)
    y, yt = [lo, lo + 1, lo + 2, lo + 25 if split == "letters" else lo + 9, lo, lo + 3], [lo + 4, lo, lo + 1]
    f = _write_idx(folder, split, "train", x, y, gz)
    _write_idx(folder, split, "test", xt, yt, gz)
    return x, np.array(y) - lo, xt, np.array(yt) - lo, f


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("sub", [("EMNIST", "raw"), ("raw",), ()])
def test_idx_letters(tmp_path, gz, sub):
    x, y, xt, yt, _ = _write_all_idx(str(tmp_path), gz=gz, sub=sub)
    src = load_emnist(str(tmp_path), download=False)
    assert src.name == "emnist-letters" and src.classes == list("abcdefghijklmnopqrstuvwxyz")
    got = src.train.get(np.arange(6))
    assert got.shape == (6, 28, 28, 1) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], x)  # transposed back: mark is top-left, horizontal
    assert (got[:, 0:3, 0:10] == 255).all() and not (got[:, 3:10, 0:3] == 255).all()
    np.testing.assert_array_equal(src.train.labels, y)  # 1..26 -> 0..25
    assert src.train.labels.max() == 25
    np.testing.assert_array_equal(src.test.get(np.arange(3))[..., 0], xt)
    np.testing.assert_array_equal(src.test.labels, yt)


def test_idx_digits_and_balanced(tmp_path):
    _write_all_idx(str(tmp_path), split="digits")
    src = load_emnist(str(tmp_path), split="digits", format="idx", download=False)
    assert src.classes == [str(i) for i in range(10)] and src.train.labels.tolist() == [0, 1, 2, 9, 0, 3]
    _write_all_idx(str(tmp_path), split="balanced")
    src = load_emnist(str(tmp_path), split="balanced", download=False)
    assert len(src.classes) == 47 and src.classes[10] == "A" and src.classes[-1] == "t"


def test_idx_truncated_and_bad_magic(tmp_path):
    _, _, _, _, files = _write_all_idx(str(tmp_path), gz=False)
    img = files["images-idx3"]
    data = open(img, "rb").read()
    open(img, "wb").write(data[:-100])
    with pytest.raises(OCLError, match=r"emnist-letters-train-images-idx3-ubyte: file is truncated"):
        load_emnist(str(tmp_path), download=False)
    open(img, "wb").write(b"\x08\x03\x00\x00" + data[4:])
    with pytest.raises(OCLError, match="magic"):
        read_idx(img, 3)
    with pytest.raises(OCLError, match="dimensions"):
        read_idx(files["labels-idx1"], 3)


def test_idx_truncated_gzip(tmp_path):
    _, _, _, _, files = _write_all_idx(str(tmp_path))
    lbl = files["labels-idx1"]
    big = gzip.compress(os.urandom(5000))  # incompressible, so a cut lands in the deflate stream
    open(lbl, "wb").write(big[: len(big) // 2])
    with pytest.raises(OCLError, match="labels-idx1-ubyte.gz.*corrupt or truncated"):
        load_emnist(str(tmp_path), download=False)


@pytest.mark.parametrize("bad", [0, 27])
def test_idx_letter_label_out_of_range(tmp_path, bad):
    folder = tmp_path / "EMNIST" / "raw"
    _write_all_idx(str(tmp_path))
    _write_idx(str(folder), "letters", "test", _upright(2), [3, bad])
    with pytest.raises(OCLError, match=rf"test-labels-idx1-ubyte.gz: label {bad} at index 1 is outside 1..26"):
        load_emnist(str(tmp_path), download=False)


def test_idx_partial_set(tmp_path):
    _write_all_idx(str(tmp_path))
    gone = tmp_path / "EMNIST" / "raw" / "emnist-letters-test-labels-idx1-ubyte.gz"
    gone.unlink()
    with pytest.raises(OCLError) as e:
        load_emnist(str(tmp_path), download=False)
    assert str(tmp_path / "EMNIST" / "raw" / "emnist-letters-test-labels-idx1-ubyte") in str(e.value)


def test_idx_explicit_files(tmp_path):
    _, y, _, _, files = _write_all_idx(str(tmp_path / "any"))
    src = load_emnist(str(tmp_path / "elsewhere"), train_file=files["images-idx3"], download=False)
    assert src.test is None and src.train.labels.tolist() == y.tolist()


def _write_csv(path, upright, labels, header=False, floats=True):
    rows = np.concatenate([np.asarray(labels)[:, None], upright.transpose(0, 2, 1).reshape(len(labels), -1)], 1)
    fmt = "%.1f" if floats else "%d"
    with open(path, "w") as f:
        if header:
            f.write("label," + ",".join(f"p{i}" for i in range(784)) + "\n")
        np.savetxt(f, rows.astype(float), fmt=fmt, delimiter=",")
    return str(path)


@pytest.mark.parametrize("header", [False, True])
def test_csv_explicit(tmp_path, header):
    x, xt = _upright(5), _upright(2, 3)
    tr = _write_csv(tmp_path / "light-train.csv", x, [1, 26, 3, 4, 5], header=header)
    te = _write_csv(tmp_path / "light-test.csv", xt, [2, 1], floats=False)
    src = load_emnist(format="csv", train_file=tr, test_file=te, download=False)
    np.testing.assert_array_equal(src.train.get(np.arange(5))[..., 0], x)
    assert src.train.labels.tolist() == [0, 25, 2, 3, 4] and src.test.labels.tolist() == [1, 0]
    assert src.test.get(np.arange(2)).shape == (2, 28, 28, 1)


def test_csv_found_in_root(tmp_path):
    _write_csv(tmp_path / "emnist-mnist-train.csv", _upright(3), [0, 9, 5])
    src = load_emnist(str(tmp_path), split="mnist", download=False)
    assert src.name == "emnist-mnist" and src.train.labels.tolist() == [0, 9, 5] and src.test is None


def test_csv_bad_row_length(tmp_path):
    p = _write_csv(tmp_path / "t.csv", _upright(3), [1, 2, 3])
    lines = open(p).read().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]  # row 3 loses a pixel
    open(p, "w").write("\n".join(lines) + "\n")
    with pytest.raises(OCLError, match=r"t.csv: row 3 has 784 values; expected 785"):
        load_emnist(train_file=p, download=False)


def test_csv_label_out_of_range_and_bad_pixel(tmp_path):
    p = _write_csv(tmp_path / "t.csv", _upright(3), [1, 27, 3])
    with pytest.raises(OCLError, match=r"t.csv: label 27 at row 2 is outside 1..26"):
        load_emnist(train_file=p, download=False)
    x = _upright(2).astype(float)
    x[1, 5, 5] = 300
    p = _write_csv(tmp_path / "u.csv", x, [1, 2])
    with pytest.raises(OCLError, match=r"u.csv: row 2 has pixel values outside"):
        load_emnist(train_file=p, download=False)


def test_csv_missing_file(tmp_path):
    with pytest.raises(OCLError, match="nope.csv"):
        load_emnist(train_file=str(tmp_path / "nope.csv"), download=False)


def test_missing_no_download(tmp_path):
    with pytest.raises(OCLError) as e:
        load_emnist(str(tmp_path), download=False)
    msg = str(e.value)
    assert str(tmp_path / "EMNIST" / "raw" / "emnist-letters-train-images-idx3-ubyte") in msg
    assert str(tmp_path / "emnist-letters-train.csv") in msg and "train_file" in msg


def test_missing_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "network_available", lambda *a, **k: False)
    with pytest.raises(OCLError, match="cannot be reached") as e:
        load_emnist(str(tmp_path), split="digits", download=True)
    assert str(tmp_path / "EMNIST" / "raw" / "emnist-digits-test-labels-idx1-ubyte") in str(e.value)


def test_download_via_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeEMNIST:
        def __init__(self, root, split, train=True, download=False):
            calls.append((root, split, train, download))
            _write_all_idx(root, split=split, gz=False)  # torchvision leaves them unzipped

    monkeypatch.setattr(download, "network_available", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets, "EMNIST", FakeEMNIST)
    src = load_emnist(str(tmp_path), split="digits")
    assert calls == [(str(tmp_path), "digits", False, True)] and len(src.train) == 6


def test_bad_split_and_format():
    with pytest.raises(OCLError, match="split"):
        load_emnist(split="kanji")
    with pytest.raises(OCLError, match="format"):
        load_emnist(format="parquet")
