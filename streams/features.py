"""Frozen feature extractors: an :class:`Extractor` maps a batch of images ``(n, H, W, C)``
uint8 to features ``(n, D)`` float32 (raw pixels, or a frozen timm backbone). Running one
over a whole image set, with the on-disk cache, is :mod:`ocl.streams.cache`.
"""

from __future__ import annotations

import abc
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.streams.backbones import DEFAULT_BACKBONE, build_backbone
from ocl.threads import torch_threads



class Extractor(abc.ABC):
    """Maps image batches to feature vectors: ``(n, H, W, C)`` uint8 -> ``(n, D)`` float32."""

    #: whether :func:`extract_features` should cache this extractor's output on disk
    cacheable: bool = True

    @property
    @abc.abstractmethod
    def feature_dim(self) -> int | None:
        """D, or ``None`` while it depends on inputs not yet seen."""

    @abc.abstractmethod
    def key(self) -> str:
        """A string that changes whenever the features would (model, weights, preprocessing)."""

    @property
    def info(self) -> dict[str, Any]:
        """What results and tables say about the backbone: at least ``model`` and ``weights``
        (``"none"``, ``"random"``, or where pretrained weights came from)."""
        return {"model": type(self).__name__, "weights": "none"}

    @abc.abstractmethod
    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        """``(n, H, W, C)`` uint8 -> ``(n, D)`` float32 on the CPU."""


class PixelExtractor(Extractor):
    """Raw pixels as features: ``(n, H, W, C)`` uint8 -> ``(n, H*W*C)`` in [0, 1].

    Ready-made feature vectors ``(n, D)`` pass through unchanged. Not cached: reading the
    images is as cheap as computing this.
    """

    cacheable = False

    def __init__(self) -> None:
        self._dim: int | None = None

    @property
    def feature_dim(self) -> int | None:
        return self._dim

    def key(self) -> str:
        return "pixels/v1"

    @property
    def info(self) -> dict[str, Any]:
        return {"model": "pixels", "weights": "none"}

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        batch = np.asarray(batch)
        if batch.ndim == 2:  # (n, D) feature vectors
            out = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        elif batch.ndim == 4:  # (n, H, W, C) images
            x = torch.from_numpy(np.ascontiguousarray(batch))
            out = x.reshape(x.shape[0], -1).to(torch.float32) / 255.0  # (n, H*W*C)
        else:
            raise OCLError(f"pixels: expected (n, H, W, C) images or (n, D) vectors; got {batch.shape}.")
        self._dim = int(out.shape[1])
        return out


PRECISIONS = ("auto", "fp32", "bf16")


class TimmExtractor(Extractor):
    """Pooled features of a frozen timm backbone (DINO ViT-S/16 by default).

    Preprocessing, all in torch: grayscale -> 3 channels, bicubic antialiased resize to
    ``image_size`` (clamped to [0, 1] like a uint8 resize), normalise with the model's
    mean/std. No crop: the whole image is kept.

    Args:
        model: backbone name (see :mod:`ocl.streams.backbones`).
        weights: ``"auto"``, ``"random"`` or a checkpoint path.
        image_size: side S of the model input.
        batch_size: images per forward pass.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ...
        model_kwargs: extra ``timm.create_model`` arguments.
        threads: torch intra-op threads while extracting (``None``: torch's default,
            every core); restored afterwards.
        precision: ``"fp32"`` (default), ``"bf16"`` (autocast: the fast choice on a GPU, and
            on CPUs with native bf16 instructions: 1.8x at 128 px on this project's
            AVX512-BF16 EPYC, ``scripts/bench_features.py``) or ``"auto"`` (bf16 on CUDA,
            fp32 on the CPU). bf16 changes the features (by up to a few percent of their
            largest value), so it is part of the cache key. fp32 is the default so that the
            features and their cache entry do not depend on the machine (a CPU-only driver
            and GPU Ray workers must agree on the key; see ``ocl.extract``).
        channels_last: run the network and its input in the channels-last memory format:
            ``True``, ``False`` or ``"auto"`` (on CUDA only, where it is the fast layout for
            convolutions under bf16; on this project's CPU it made no consistent difference,
            ``scripts/bench_features.py``). It changes features only by float rounding (on
            that CPU: not at all), like the thread count or batch size, so it is not part
            of the cache key.
    """

    def __init__(
        self,
        model: str = DEFAULT_BACKBONE,
        weights: str = "auto",
        image_size: int = 224,
        batch_size: int = 64,
        device: str = "auto",
        model_kwargs: dict[str, Any] | None = None,
        threads: int | None = None,
        precision: str = "fp32",
        channels_last: bool | str = "auto",
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise OCLError(
                f"backbone.device={device!r} but no CUDA GPU is available; use 'auto' or 'cpu'.")
        if batch_size < 1:
            raise OCLError(f"backbone.batch_size must be >= 1; got {batch_size}.")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise OCLError(f"backbone.threads must be an integer >= 1 or null; got {threads!r}.")
        if precision not in PRECISIONS:
            raise OCLError(f"backbone.precision must be one of {list(PRECISIONS)}; got {precision!r}.")
        if not isinstance(channels_last, bool) and channels_last != "auto":
            raise OCLError(f"backbone.channels_last must be true, false or auto; got {channels_last!r}.")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.threads = threads
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        self.channels_last = self.device.type == "cuda" if channels_last == "auto" else bool(channels_last)
        self.model_kwargs = dict(model_kwargs or {})
        with torch_threads(threads, "backbone.threads"):
            self.net, self._info = build_backbone(model, weights, image_size, self.model_kwargs)
        self.net.to(self.device)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.image_size = self._info["image_size"]
        self._mean = torch.tensor(self._info["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self._info["std"], device=self.device).view(1, 3, 1, 1)

    @property
    def info(self) -> dict[str, Any]:
        """The backbone info dict (model, weights source, weights_sha1, D, mean, std, size,
        precision)."""
        return {**self._info, "precision": self.precision}

    @property
    def feature_dim(self) -> int:
        return int(self._info["feature_dim"])

    def key(self) -> str:
        i = self._info
        key = {
            "kind": "timm/v1", "model": i["model"], "weights_sha1": i["weights_sha1"],
            "image_size": i["image_size"], "mean": i["mean"], "std": i["std"],
            "resize": "bicubic-antialias-clamp", "model_kwargs": repr(sorted(self.model_kwargs.items())),
        }
        if self.precision != "fp32":  # only then: fp32 keys (and caches) stay as they were
            key["precision"] = self.precision
        return json.dumps(key, sort_keys=True)

    def preprocess(self, batch: np.ndarray) -> torch.Tensor:
        """``(n, H, W, C)`` uint8 -> ``(n, 3, S, S)`` normalised float32 on the device."""
        if batch.ndim != 4:
            raise OCLError(
                f"backbone {self._info['model']} needs images (n, H, W, C); got shape {batch.shape}. "
                f"Feature-vector data sets can only be used with backbone=pixels."
            )
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (n, C, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        S = self.image_size
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots; a uint8 resize would clip too
        x = (x - self._mean) / self._std  # (n, 3, S, S)
        # one layout whatever the input's strides (an expanded grayscale batch would otherwise
        # take another conv kernel and differ from its RGB copy by float rounding)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        out = []
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with torch_threads(self.threads, "backbone.threads"), torch.inference_mode(), amp:
            for s in range(0, len(batch), self.batch_size):
                x = self.preprocess(batch[s:s + self.batch_size])
                out.append(self.net(x).float().cpu())  # (b, D)
        if not out:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(out)  # (n, D)


def make_extractor(name: str = DEFAULT_BACKBONE, **kwargs: Any) -> Extractor:
    """Build an extractor from a config: ``"pixels"`` or a backbone name plus TimmExtractor options."""
    if name == "pixels":
        if kwargs:
            raise OCLError(f"backbone 'pixels' takes no options; got {sorted(kwargs)}.")
        return PixelExtractor()
    try:
        return TimmExtractor(name, **kwargs)
    except TypeError as e:
        raise OCLError(f"backbone {name!r}: invalid option ({e}).") from e
