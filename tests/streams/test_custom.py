import numpy as np
import pytest
import torch
from PIL import Image

from ocl.errors import OCLError
from ocl.streams.base import ArrayImageSet, Source
from ocl.streams.custom import to_source


def _hwc(n=4, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, 5, 6, 3), dtype=np.uint8)  # (n, H, W, C)
    return x, np.arange(n) % 2


class MapDataset:
    """A map-style dataset (len + getitem), like a torch Dataset."""

    def __init__(self, items, classes=None):
        self.items = items
        if classes:
            self.classes = classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_source_passthrough_and_imageset():
    x, y = _hwc()
    src = Source("s", ArrayImageSet(x, y), None, ["a", "b"])
    assert to_source(src) is src
    s2 = to_source(ArrayImageSet(x, y), name="n")
    assert s2.name == "n" and s2.classes == ["0", "1"]


def test_tuple_of_arrays_and_dict():
    x, y = _hwc()
    src = to_source((x, y))
    np.testing.assert_array_equal(src.train.get(np.arange(4)), x)
    d = to_source({"train": (x, y), "test": (x[:2], y[:2]), "classes": ["cat", "dog"]}, name="pets")
    assert d.name == "pets" and d.classes == ["cat", "dog"] and len(d.test) == 2
    t = to_source((torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y)))  # NCHW float
    np.testing.assert_array_equal(t.train.get(np.arange(4)), x)


@pytest.mark.parametrize("kind", ["pil", "pil_gray", "numpy_hwc", "numpy_hw", "torch_float", "torch_uint8"])
def test_map_dataset_item_kinds(kind):
    x, y = _hwc()
    if kind == "pil_gray":
        x = x[..., :1]
    conv = {
        "pil": lambda a: Image.fromarray(a),
        "pil_gray": lambda a: Image.fromarray(a[..., 0]),
        "numpy_hwc": lambda a: a,
        "numpy_hw": lambda a: a[..., 0],
        "torch_float": lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255.0,
        "torch_uint8": lambda a: torch.from_numpy(a).permute(2, 0, 1),
    }[kind]
    src = to_source(MapDataset([(conv(a), int(b)) for a, b in zip(x, y)]))
    want = x[..., :1] if kind == "numpy_hw" else x
    np.testing.assert_array_equal(src.train.get(np.arange(4)), want)
    np.testing.assert_array_equal(src.train.labels, y)


def test_iterables_generator_and_dataloader():
    x, y = _hwc(6)
    gen = ((x[i], np.int64(y[i])) for i in range(6))
    assert len(to_source(gen).train) == 6
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y))
    dl = torch.utils.data.DataLoader(ds, batch_size=4)  # yields (B, C, H, W), (B,) batches
    src = to_source(dl)
    np.testing.assert_array_equal(src.train.get(np.arange(6)), x)
    np.testing.assert_array_equal(src.train.labels, y)


def test_classes_attribute_and_feature_vectors():
    ds = MapDataset([(np.ones(5, np.float32) * i, i) for i in range(3)], classes=["x", "y", "z", "w"])
    src = to_source(ds)
    assert src.classes == ["x", "y", "z", "w"] and src.train.get(np.arange(3)).shape == (3, 5)


def test_bad_items():
    x, y = _hwc()
    with pytest.raises(OCLError, match=r"item 1 is int .*expected an \(image, label\) pair"):
        to_source([(x[0], 0), 5])
    with pytest.raises(OCLError, match=r"item 2: label 'cat' is not an integer"):
        to_source([(x[0], 0), (x[1], 1), (x[2], "cat")])
    with pytest.raises(OCLError, match=r"item 1 has shape \(4, 4, 3\).*item 0 has \(5, 6, 3\)"):
        to_source([(x[0], 0), (x[1][:4, :4], 1)])
    with pytest.raises(OCLError, match="Normalize"):
        to_source([(torch.full((3, 4, 4), -0.5), 0)])
    with pytest.raises(OCLError, match="item 0: image is a str"):
        to_source([("img.png", 0)])
    with pytest.raises(OCLError, match="1 or 3"):
        to_source([(np.zeros((4, 4, 4), np.uint8), 0)])
    with pytest.raises(OCLError, match="yielded no items"):
        to_source([])


def test_bad_objects():
    with pytest.raises(OCLError, match="expected a Source"):
        to_source(42)
    with pytest.raises(OCLError, match="expected a Source"):
        to_source("path/to/data")
    with pytest.raises(OCLError, match="needs key 'train'"):
        to_source({"x": 1})
    with pytest.raises(OCLError, match="outside the declared"):
        to_source({"train": (np.zeros((2, 3, 3), np.uint8), np.array([0, 5])), "classes": ["a"]})


def test_sparse_labels_of_pairs_are_renumbered_but_a_given_image_set_is_not_rewritten():
    from ocl.streams.base import ImageSet

    src = to_source([(np.zeros((2, 2), np.uint8), 5), (np.zeros((2, 2), np.uint8), 1_000_000)])
    assert src.classes == ["5", "1000000"] and src.label_map == [5, 1_000_000] and src.train.labels.tolist() == [0, 1]

    class Mine(ImageSet):
        labels = np.array([0, 1_000_000])

    with pytest.raises(OCLError, match=r"labels are not 0..K-1 \(2 distinct values up to 1000000\) in a Mine"):
        to_source(Mine())
