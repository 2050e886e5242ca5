"""Loading a backbone's weights from a checkpoint file strictly, and the weights' identity.

:func:`load_checkpoint_file` accepts official DINO ``.pth`` files, timm state dicts
(``.safetensors``, ``.pth``, ``.bin``) and EfficientNet-PyTorch ``.pth`` files, adapts their
layout, and loads with ``strict=True``: the only keys dropped on purpose (the DINO projection
head, a classifier that ``num_classes=0`` removes) are named in the log.
:func:`state_dict_sha1` is the weights' identity (results and the feature cache key use it).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ocl.errors import OCLError
from ocl.streams import efficientnet

log = logging.getLogger(__name__)


def state_dict_sha1(net: nn.Module) -> str:
    """SHA-1 over the model's state dict: names, dtypes, shapes and raw bytes, in key order."""
    h = hashlib.sha1()
    for k, v in sorted(net.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().data if v.numel() else b"")
    return h.hexdigest()


def load_checkpoint_file(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint file into ``net`` strictly, adapting known formats first.

    Accepts official DINO ``.pth`` files (a plain backbone state dict, or a full training
    checkpoint whose ``teacher`` entry has ``module.``/``backbone.`` prefixes and a
    ``head.`` projection head, which is dropped), timm ``.safetensors`` /
    ``.pth`` / ``.bin`` state dicts, possibly nested under ``state_dict`` or ``model``, and
    EfficientNet-PyTorch state dicts (``_conv_stem.weight``, ...; renamed by position).
    The model family's own timm ``checkpoint_filter_fn`` then converts layouts (e.g.
    official DINOv2 keys) and resamples position embeddings to the model's image size.

    Raises:
        OCLError: the file is missing, unreadable or corrupt, or its keys/shapes do not
            match the model (the message lists missing and unexpected keys).
    """
    path = Path(path)
    sd = _read_file(path)
    sd = _unwrap(sd, path)
    if efficientnet.is_efficientnet_pytorch_layout(sd):
        sd = efficientnet.from_efficientnet_pytorch_layout(sd, net, path)
    sd = _timm_filter(sd, net, path)
    sd = _drop_classifier(sd, net, path)
    _load_strict(net, sd, path)
    log.info("loaded %d tensors from %s", len(sd), path)


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise OCLError(f"checkpoint file not found: {path}")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # weights_only keeps torch.load from running arbitrary pickled code; official DINO
        # training checkpoints also pickle their argparse.Namespace, which is harmless.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OCLError(
            f"could not read checkpoint {path}: {type(e).__name__}: {first}. The file is "
            f"corrupt, truncated, or not a PyTorch/safetensors state dict (files that pickle "
            f"custom classes are refused; re-save with torch.save(model.state_dict(), ...))."
        ) from e
    if not isinstance(obj, dict):
        raise OCLError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict.")
    return obj


def _unwrap(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Find the backbone state dict inside a checkpoint and strip wrapper prefixes."""
    if "teacher" in obj and isinstance(obj["teacher"], dict):
        # DINO full checkpoint: the teacher (EMA) network is the one DINO evaluates.
        log.info("%s: DINO training checkpoint, using the 'teacher' weights", path)
        obj = obj["teacher"]
    for wrapper in ("state_dict", "model"):  # common trainer/timm wrappers
        if wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise OCLError(
            f"checkpoint {path} does not look like a state dict: entries {not_tensors[:5]} are "
            f"not tensors (top-level keys: {list(obj)[:8]})."
        )
    sd = {k.removeprefix("module."): v for k, v in obj.items()}  # DistributedDataParallel
    if any(k.startswith("backbone.") for k in sd):  # DINO MultiCropWrapper(backbone, head)
        dropped = [k for k in sd if not k.startswith("backbone.")]
        if dropped:
            log.info("%s: dropping %d non-backbone keys (DINO projection head): %s",
                     path, len(dropped), _few(dropped))
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _family_filter_fn(net: nn.Module) -> Callable | None:
    """timm's ``checkpoint_filter_fn`` from the module that defines the model's class.

    Every timm model module passes its ``checkpoint_filter_fn`` to ``build_model_with_cfg``
    as ``pretrained_filter_fn``; reusing it keeps format conversions and position-embedding
    resampling identical to timm's.
    """
    module_name = type(net).__module__
    if not module_name.startswith("timm."):
        return None
    return getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)


def _timm_filter(sd: dict[str, torch.Tensor], net: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    fn = _family_filter_fn(net)
    if fn is None:
        return sd
    try:
        return fn(dict(sd), net)
    except Exception as e:
        raise OCLError(
            f"checkpoint {path} could not be adapted to {type(net).__name__} by timm's "
            f"checkpoint filter ({type(e).__name__}: {e}). Does backbone.model match the "
            f"checkpoint's architecture?"
        ) from e


def _drop_classifier(sd: dict[str, torch.Tensor], net: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """num_classes=0 removes the classifier, so its weights in a checkpoint are expected extras."""
    if getattr(net, "num_classes", None) != 0:
        return sd
    names = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else names
    own = net.state_dict().keys()
    drop = [k for c in names for k in (f"{c}.weight", f"{c}.bias") if k in sd and k not in own]
    if drop:
        log.info("%s: dropping classifier weights %s (features are taken before it)", path, drop)
    return {k: v for k, v in sd.items() if k not in drop}


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _load_strict(net: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {path} does not match backbone {type(net).__name__} "
                 f"({getattr(net, 'pretrained_cfg', {}).get('architecture', '?')}):"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_few(shapes, 3)}")
        parts.append("Check that backbone.model is the architecture the file was trained with.")
        raise OCLError("\n  ".join(parts))
    net.load_state_dict(sd, strict=True)
