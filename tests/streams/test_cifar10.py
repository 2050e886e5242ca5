import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from ocl.errors import OCLError
from ocl.streams import download
from ocl.streams.cifar10 import CIFAR10_CLASSES, load_cifar10

N = 4  # images per batch file


def _batch(seed, n=N):
    """Official row layout: 3072 = R plane, G plane, B plane, each 32x32 row-major."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 200, (n, 32, 32, 3), dtype=np.uint8)  # (n, H, W, C)
    imgs[:, 0, 1, 0] = 250  # R at row 0, col 1: an asymmetric marker
    labels = [(seed * n + i) % 10 for i in range(n)]
    return imgs, labels, imgs.transpose(0, 3, 1, 2).reshape(n, 3072)


def _write_pickles(folder, bytes_keys=False, skip=(), labels_override=None):
    """Write a tiny cifar-10-batches-py folder; returns the expected train/test arrays."""
    os.makedirs(folder, exist_ok=True)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    xs, ys = [], []
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        imgs, labels, rows = _batch(i)
        if labels_override and fname in labels_override:
            labels = labels_override[fname]
        xs.append(imgs)
        ys.append(labels)
        if fname in skip:
            continue
        d = {k("batch_label"): k(fname), k("labels"): labels, k("data"): rows, k("filenames"): [k("f.png")] * N}
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({k("label_names"): [k(c) for c in CIFAR10_CLASSES], k("num_vis"): 3072}, f, protocol=2)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.array(ys[5])


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_pickle_layout(tmp_path, bytes_keys):
    x, y, xt, yt = _write_pickles(tmp_path / "cifar-10-batches-py", bytes_keys)
    src = load_cifar10(str(tmp_path), download=False)
    assert src.name == "cifar10" and src.classes == CIFAR10_CLASSES
    assert src.train.get(np.arange(5 * N)).shape == (5 * N, 32, 32, 3)
    np.testing.assert_array_equal(src.train.get(np.arange(5 * N)), x)
    np.testing.assert_array_equal(src.train.labels, y)
    np.testing.assert_array_equal(src.test.get(np.arange(N)), xt)
    np.testing.assert_array_equal(src.test.labels, yt)
    assert src.train.get(np.array([0]))[0, 0, 1, 0] == 250  # channel planes and orientation decoded right


def test_pickle_folder_itself_and_explicit_layout(tmp_path):
    _write_pickles(tmp_path / "cifar-10-batches-py")
    src = load_cifar10(str(tmp_path / "cifar-10-batches-py"), layout="pickle", download=False)
    assert len(src.train) == 5 * N and len(src.test) == N


def test_pickle_missing_batch(tmp_path):
    _write_pickles(tmp_path / "cifar-10-batches-py", skip=("data_batch_3",))
    with pytest.raises(OCLError) as e:
        load_cifar10(str(tmp_path), download=False)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_3") in str(e.value)


def test_pickle_truncated(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_pickles(folder)
    p = folder / "data_batch_2"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(OCLError, match="data_batch_2"):
        load_cifar10(str(tmp_path), download=False)


def test_pickle_label_out_of_range(tmp_path):
    _write_pickles(tmp_path / "cifar-10-batches-py", labels_override={"test_batch": [0, 1, 10, 2]})
    with pytest.raises(OCLError, match=r"test_batch.*label 10 at index 2"):
        load_cifar10(str(tmp_path), download=False)


def test_pickle_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_pickles(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(OCLError, match="data_batch_1.*not allowed"):
        load_cifar10(str(tmp_path), download=False)


def _write_folder(root, classes=CIFAR10_CLASSES, per=1):
    for split in ("train", "test"):
        for ci, c in enumerate(classes):
            for k in range(per):
                a = np.full((32, 32, 3), 20 * ci, np.uint8)
                a[0, 5] = 255
                p = root / split / c / f"{k:04d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(a).save(p)
    return root


def test_imagefolder_layout_uses_official_order(tmp_path):
    root = _write_folder(tmp_path / "c10")
    src = load_cifar10(str(root), download=False)
    assert src.classes == CIFAR10_CLASSES and len(src.train) == 10 and len(src.test) == 10
    for i, rel in enumerate(src.train.paths):
        assert src.train.labels[i] == CIFAR10_CLASSES.index(rel.split(os.sep)[0])
    x = src.train.get(np.arange(10))
    assert x.shape == (10, 32, 32, 3) and x[9, 0, 5, 0] == 255
    assert x[CIFAR10_CLASSES.index("truck"), 10, 10, 0] == 20 * 9


def test_imagefolder_wrong_classes(tmp_path):
    root = _write_folder(tmp_path / "c10", ["plane"] + CIFAR10_CLASSES[1:])
    with pytest.raises(OCLError, match=r"unexpected \['plane'\].*missing \['airplane'\]"):
        load_cifar10(str(root), layout="imagefolder", download=False)


def test_zip_of_imagefolder_and_pickles(tmp_path, monkeypatch):
    monkeypatch.setenv("OCL_EXTRACT_DIR", str(tmp_path / "unpacked"))
    root = _write_folder(tmp_path / "c10")
    z = tmp_path / "c10.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, os.path.relpath(p, root))
    src = load_cifar10(str(z), download=False)
    assert len(src.train) == 10 and src.train.root == str(tmp_path / "unpacked" / "c10" / "train")
    assert load_cifar10(str(z)).train.fingerprint() == src.train.fingerprint()  # reused

    _write_pickles(tmp_path / "p" / "cifar-10-batches-py")
    zp = tmp_path / "pk.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for p in sorted((tmp_path / "p").rglob("*")):
            zf.write(p, os.path.relpath(p, tmp_path / "p"))
    assert len(load_cifar10(str(zp), download=False).train) == 5 * N


def test_missing_no_download(tmp_path):
    with pytest.raises(OCLError) as e:
        load_cifar10(str(tmp_path), download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert str(tmp_path / "train") in msg and "download=False" in msg


def test_missing_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "network_available", lambda *a, **k: False)
    with pytest.raises(OCLError) as e:
        load_cifar10(str(tmp_path), download=True)
    assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in str(e.value)
    assert "cannot be reached" in str(e.value)


def test_download_via_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            _write_pickles(os.path.join(root, "cifar-10-batches-py"))

    monkeypatch.setattr(download, "network_available", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    src = load_cifar10(str(tmp_path), download=True)
    assert calls == [(str(tmp_path), False, True)] and len(src.train) == 5 * N


def test_download_failure(tmp_path, monkeypatch):
    import torchvision.datasets

    class Failing:
        def __init__(self, *a, **k):
            raise OSError("connection reset")

    monkeypatch.setattr(download, "network_available", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Failing)
    with pytest.raises(OCLError, match="connection reset") as e:
        load_cifar10(str(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(e.value)


def test_bad_layout():
    with pytest.raises(OCLError, match="layout"):
        load_cifar10("/x", layout="tfrecord")
