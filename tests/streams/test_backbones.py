"""Backbone registry, weight sources and checkpoint formats, on tiny ViTs (no network)."""

from __future__ import annotations

import argparse
import logging
import socket

import pytest
import timm
import torch
from safetensors.torch import save_file

from ocl.errors import OCLError
from ocl.streams import backbones, weights
from ocl.streams.backbones import BACKBONES, build_backbone, register_backbone, resolve_model_name
from ocl.streams.weights import load_checkpoint_file, state_dict_sha1

TINY = dict(embed_dim=24, depth=1, num_heads=2)  # D = 24, one block: builds in milliseconds
ARCH = "vit_small_patch16_224"

# Key names of the official DINO VisionTransformer (facebookresearch/dino,
# vision_transformer.py) with depth=1 and num_classes=0 (head = Identity, no params).
OFFICIAL_DINO_KEYS = [
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias",
    "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
    "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
    "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "norm.weight", "norm.bias",
]


def source_model(num_classes: int = 0, img_size: int = 32, seed: int = 1, name: str = ARCH, **kw) -> torch.nn.Module:
    """A tiny timm ViT whose weights differ from build_backbone's seeded random init."""
    torch.manual_seed(seed)
    m = timm.create_model(name, num_classes=num_classes, img_size=img_size, **{**TINY, **kw}).eval()
    with torch.no_grad():  # LayerNorm/bias init is constant; make every tensor distinctive
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def pooled(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, D) pooled pre-classifier features."""
    with torch.no_grad():
        return m.forward_head(m.forward_features(x), pre_logits=True)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, S, S)


# --- registry ------------------------------------------------------------------------


def test_registry_names() -> None:
    assert resolve_model_name("dino_vits16") == "vit_small_patch16_224.dino"
    assert resolve_model_name("dino_vitb16") == "vit_base_patch16_224.dino"
    assert resolve_model_name("dinov2_vits14") == "vit_small_patch14_dinov2.lvd142m"
    assert resolve_model_name("resnet18") == "resnet18"  # any timm name passes through
    with pytest.raises(OCLError, match="dino_vits16"):
        resolve_model_name("no_such_model")
    with pytest.raises(ValueError):
        register_backbone("dino_vits16", "resnet18")
    register_backbone("dino_vits16", BACKBONES["dino_vits16"])  # same mapping: no-op


# --- random / sources ----------------------------------------------------------------


def test_random_init_is_marked_frozen_and_reproducible(caplog, x) -> None:
    with caplog.at_level(logging.WARNING):
        net, info = build_backbone(ARCH, weights="random", image_size=32, model_kwargs=TINY)
    assert info["weights"] == "random"
    assert any("RANDOM" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert info["feature_dim"] == 24 and info["image_size"] == 32
    assert len(info["mean"]) == 3 and len(info["std"]) == 3
    assert net(x).shape == (3, 24)
    _, info2 = build_backbone(ARCH, weights="random", image_size=32, model_kwargs=TINY)
    assert info2["weights_sha1"] == info["weights_sha1"]  # seeded init: same features every run


def test_missing_weights_path_and_bad_kwargs() -> None:
    with pytest.raises(OCLError, match="no such file"):
        build_backbone(ARCH, weights="/nonexistent/dino.pth", image_size=32, model_kwargs=TINY)
    with pytest.raises(OCLError, match="model_kwargs"):
        build_backbone(ARCH, weights="random", model_kwargs=dict(TINY, not_an_arg=1))


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty HF cache in tmp_path, offline mode on, and any socket connect fails loudly."""
    from huggingface_hub import constants

    def refuse(*a, **k):
        raise AssertionError("test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_auto_offline_without_cache_says_how_to_fix(no_network) -> None:
    with pytest.raises(OCLError) as e:
        build_backbone("dino_vits16", weights="auto", image_size=32, model_kwargs=TINY)
    msg = str(e.value)
    assert "backbone.weights=/path/to/file" in msg and "backbone.weights=random" in msg
    assert "timm/vit_small_patch16_224.dino" in msg and str(no_network) in msg
    assert "HF_HUB_OFFLINE" in msg


def test_auto_download_failure_says_how_to_fix(no_network, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real_create = timm.create_model
    tried = []

    def create(name, pretrained=False, **kw):
        if pretrained:
            tried.append(name)
            raise OSError("Network is unreachable")
        return real_create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setattr(backbones, "_reachable", lambda host: True)
    with pytest.raises(OCLError, match="backbone.weights") as e:
        build_backbone("dino_vits16", weights="auto", image_size=32, model_kwargs=TINY)
    assert tried == ["vit_small_patch16_224.dino"]
    assert "download failed" in str(e.value) and "Network is unreachable" in str(e.value)


def test_auto_unreachable_hub_fails_fast(no_network, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    probed = []

    def no_route(address, timeout=None):
        probed.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    with pytest.raises(OCLError, match="cannot be reached") as e:
        build_backbone("dino_vits16", weights="auto", image_size=32, model_kwargs=TINY)
    assert probed == [("huggingface.co", 443)] and "backbone.weights=random" in str(e.value)


def test_auto_uses_hf_cache_without_network(no_network, x) -> None:
    src = source_model()
    snap = no_network / "models--timm--vit_small_patch16_224.dino" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (no_network / "models--timm--vit_small_patch16_224.dino" / "refs").mkdir()
    (no_network / "models--timm--vit_small_patch16_224.dino" / "refs" / "main").write_text("a" * 40)
    save_file(src.state_dict(), str(snap / "model.safetensors"))
    net, info = build_backbone("dino_vits16", weights="auto", image_size=32, model_kwargs=TINY)
    assert info["weights"] == f"hf-cache:{snap / 'model.safetensors'}"
    assert info["model"] == "vit_small_patch16_224.dino"
    torch.testing.assert_close(net(x), pooled(src, x), rtol=0, atol=0)


# --- checkpoint formats --------------------------------------------------------------


def test_official_dino_plain_state_dict(tmp_path, x) -> None:
    src = source_model()
    sd = src.state_dict()
    assert list(sd) == OFFICIAL_DINO_KEYS  # timm's names are DINO's: no renaming needed
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save({k: sd[k] for k in OFFICIAL_DINO_KEYS}, path)
    net, info = build_backbone(ARCH, weights=str(path), image_size=32, model_kwargs=TINY)
    assert info["weights"] == f"file:{path.resolve()}"
    assert info["weights_sha1"] == state_dict_sha1(src)
    torch.testing.assert_close(net(x), pooled(src, x), rtol=0, atol=0)


@pytest.mark.parametrize("teacher_prefix", ["backbone.", "module.backbone."])
def test_official_dino_full_checkpoint_takes_teacher(tmp_path, x, teacher_prefix) -> None:
    teacher, student = source_model(seed=1), source_model(seed=2)
    head = {  # DINOHead: 3-layer MLP + weight-normed last layer
        "head.mlp.0.weight": torch.randn(32, 24), "head.mlp.0.bias": torch.zeros(32),
        "head.mlp.2.weight": torch.randn(32, 32), "head.mlp.2.bias": torch.zeros(32),
        "head.mlp.4.weight": torch.randn(8, 32), "head.mlp.4.bias": torch.zeros(8),
        "head.last_layer.weight_g": torch.ones(16, 1), "head.last_layer.weight_v": torch.randn(16, 8),
    }
    tpre = teacher_prefix.removesuffix("backbone.")
    ckpt = {
        "teacher": {**{teacher_prefix + k: v for k, v in teacher.state_dict().items()},
                    **{tpre + k: v for k, v in head.items()}},
        "student": {**{"module.backbone." + k: v for k, v in student.state_dict().items()},
                    **{"module." + k: v for k, v in head.items()}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),  # as main_dino.py saves
        "dino_loss": {"center": torch.zeros(1, 16)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    net, _ = build_backbone(ARCH, weights=str(path), image_size=32, model_kwargs=TINY)
    torch.testing.assert_close(net(x), pooled(teacher, x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-nested"])
def test_timm_state_dict_with_classifier(tmp_path, x, fmt) -> None:
    src = source_model(num_classes=10)  # a classifier checkpoint: head.* is dropped for features
    sd = src.state_dict()
    assert "head.weight" in sd
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "model.pth"
        torch.save({"state_dict": sd, "epoch": 3} if fmt == "pth-nested" else sd, path)
    net, _ = build_backbone(ARCH, weights=str(path), image_size=32, model_kwargs=TINY)
    torch.testing.assert_close(net(x), pooled(src, x), rtol=0, atol=0)


def test_pos_embed_is_resampled_by_timm_filter(tmp_path) -> None:
    src = source_model(img_size=32)  # 2x2 patch grid
    path = tmp_path / "dino.pth"
    torch.save(src.state_dict(), path)
    net, info = build_backbone(ARCH, weights=str(path), image_size=48, model_kwargs=TINY)  # 3x3 grid
    assert net.pos_embed.shape == (1, 1 + 9, 24) and info["image_size"] == 48
    assert net(torch.randn(2, 3, 48, 48)).shape == (2, 24)


def test_official_dinov2_layout_is_converted(tmp_path) -> None:
    src = source_model(name="vit_small_patch14_dinov2", img_size=28)
    sd = dict(src.state_dict(), mask_token=torch.zeros(1, 24))  # official DINOv2 .pth extra
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    net, _ = build_backbone("dinov2_vits14", weights=str(path), image_size=28, model_kwargs=TINY)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(net(x), pooled(src, x), rtol=0, atol=0)


def test_wrong_key_is_reported(tmp_path) -> None:
    sd = source_model().state_dict()
    sd["norm.wieght"] = sd.pop("norm.weight")
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    net, _ = build_backbone(ARCH, weights="random", image_size=32, model_kwargs=TINY)
    with pytest.raises(OCLError) as e:
        load_checkpoint_file(net, path)
    msg = str(e.value)
    assert "missing keys (1): norm.weight" in msg and "unexpected keys (1): norm.wieght" in msg
    assert str(path) in msg


def test_missing_key_and_wrong_shape_are_reported(tmp_path) -> None:
    sd = source_model().state_dict()
    del sd["blocks.0.mlp.fc2.bias"]
    path = tmp_path / "missing.pth"
    torch.save(sd, path)
    with pytest.raises(OCLError, match=r"missing keys \(1\): blocks\.0\.mlp\.fc2\.bias"):
        build_backbone(ARCH, weights=str(path), image_size=32, model_kwargs=TINY)
    wide = source_model(embed_dim=32)  # a checkpoint of another width
    path = tmp_path / "wide.pth"
    torch.save(wide.state_dict(), path)
    with pytest.raises(OCLError, match="shape mismatches"):
        build_backbone(ARCH, weights=str(path), image_size=32, model_kwargs=TINY)


@pytest.mark.parametrize("kind", ["garbage.pth", "truncated.pth", "truncated.safetensors", "list.pth"])
def test_corrupt_file_is_reported(tmp_path, kind) -> None:
    sd = source_model().state_dict()
    path = tmp_path / kind
    if kind == "garbage.pth":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "truncated.pth":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "truncated.safetensors":
        save_file(sd, str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save([1, 2, 3], path)
    net, _ = build_backbone(ARCH, weights="random", image_size=32, model_kwargs=TINY)
    before = state_dict_sha1(net)
    with pytest.raises(OCLError, match=str(path).replace(".", r"\.")):
        load_checkpoint_file(net, path)
    assert state_dict_sha1(net) == before  # nothing half-loaded


def test_family_filter_is_timms(tmp_path) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    net, _ = build_backbone(ARCH, weights="random", image_size=32, model_kwargs=TINY)
    assert weights._family_filter_fn(net) is checkpoint_filter_fn
