import numpy as np
import pytest

from ocl.errors import OCLError
from ocl.streams.arrays import load_arrays


def _data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 5, 4, 3), dtype=np.uint8), np.arange(n) % 3


def test_npz_train_test(tmp_path):
    x, y = _data()
    xt, yt = _data(2, 1)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x, y_train=y, x_test=xt, y_test=yt)
    src = load_arrays(str(p), name="mine")
    assert src.name == "mine" and src.classes == ["0", "1", "2"]
    np.testing.assert_array_equal(src.train.get(np.arange(6)), x)
    np.testing.assert_array_equal(src.test.labels, yt)


def test_npz_xy_and_classes(tmp_path):
    x, y = _data()
    p = tmp_path / "d.npz"
    np.savez(p, x=x[..., 0], y=y)  # (n, H, W) grayscale
    src = load_arrays(str(p), classes=["a", "b", "c", "d"])
    assert src.test is None and src.classes == ["a", "b", "c", "d"]
    assert src.train.get(np.array([0])).shape == (1, 5, 4, 1)


def test_npy_folder_and_pair(tmp_path):
    x, y = _data()
    np.save(tmp_path / "x_train.npy", x)
    np.save(tmp_path / "y_train.npy", y)
    assert len(load_arrays(str(tmp_path)).train) == 6
    src = load_arrays(str(tmp_path / "x_train.npy"), y=str(tmp_path / "y_train.npy"))
    np.testing.assert_array_equal(src.train.labels, y)


def test_in_memory_features_and_float_images():
    f = np.random.default_rng(0).normal(size=(4, 7))
    src = load_arrays(x=f, y=[0, 1, 1, 0])
    assert src.train.get(np.arange(4)).dtype == np.float32 and src.train.get(np.arange(4)).shape == (4, 7)
    img = np.full((2, 3, 3, 1), 0.5)
    assert (load_arrays(x=img, y=[0, 1]).train.get(np.arange(2)) == 128).all()  # [0, 1] scaled to 0..255
    with pytest.raises(OCLError, match="float images"):
        load_arrays(x=img * 3.3, y=[0, 1])


def test_missing_keys(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=np.zeros((2, 3, 3)), targets=np.zeros(2))
    with pytest.raises(OCLError, match=r"x_train/y_train.*found \['images', 'targets'\]"):
        load_arrays(str(p))
    with pytest.raises(OCLError, match="missing.npz"):
        load_arrays(str(tmp_path / "missing.npz"))
    with pytest.raises(OCLError, match="need training images"):
        load_arrays(x=np.zeros((2, 3, 3)))


def test_shape_errors():
    x, y = _data()
    with pytest.raises(OCLError, match="6 examples but 5 labels"):
        load_arrays(x=x, y=y[:5])
    with pytest.raises(OCLError, match="one-hot"):
        load_arrays(x=x, y=np.eye(3)[y])
    with pytest.raises(OCLError, match="train items have shape"):
        load_arrays(x=x, y=y, x_test=x[:, :4], y_test=y)
    with pytest.raises(OCLError, match="x_test and y_test"):
        load_arrays(x=x, y=y, x_test=x)
    with pytest.raises(OCLError, match="outside the declared 2 classes"):
        load_arrays(x=x, y=y, classes=["a", "b"])


def test_sparse_labels_are_renumbered_in_label_order():
    y = np.array([7, 1_000_000, 7, 3])
    src = load_arrays(x=np.zeros((4, 2), np.float32), y=y, x_test=np.zeros((1, 2), np.float32), y_test=[10**9])
    assert src.classes == ["3", "7", "1000000", "1000000000"] and src.label_map == [3, 7, 1_000_000, 10**9]
    assert src.train.labels.tolist() == [1, 2, 1, 0] and src.test.labels.tolist() == [3]
    dense = load_arrays(x=np.zeros((3, 2), np.float32), y=[0, 2, 1])
    assert dense.classes == ["0", "1", "2"] and dense.label_map is None and dense.train.labels.tolist() == [0, 2, 1]
    given = load_arrays(x=np.zeros((2, 2), np.float32), y=[0, 5], classes=[str(i) for i in range(6)])
    assert given.num_classes == 6 and given.label_map is None  # declared classes are kept as they are


def test_fingerprint_of_renumbered_labels_is_that_of_dense_ones():
    a = load_arrays(x=np.zeros((2, 2), np.float32), y=[0, 9])
    b = load_arrays(x=np.zeros((2, 2), np.float32), y=[0, 1])
    assert a.train.fingerprint() == b.train.fingerprint()  # the same data and classes once renumbered
