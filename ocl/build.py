"""Config -> objects: the one way a run is built, for ``ocl run`` and ``ocl compare`` alike.

``prepare(cfg)`` turns a composed config into a :class:`Prepared` run: the source, the
stream the protocol makes of it (seeded by ``cfg.seed``) and the features of both splits
(extracted once, or read from the cache). ``ocl compare`` takes the same path without the
stream (:func:`extract`: one set of features for every learner x seed) and builds each
seed's stream with :func:`make_stream`. Learners come from their config node
(:func:`learner_config` finds a shipped one by name) through :func:`make_learner`.
Values are checked before anything is built (:mod:`ocl.options`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ocl.errors import OCLError, describe_os_error
from ocl.learners.base import Learner
from ocl.options import HYDRA_KEYS, LEARNER_ARGS, check_options, option_defaults
from ocl.streams.base import ImageSet, Source
from ocl.streams.custom import to_source
from ocl.streams.features import Extractor
from ocl.streams.prefetch import Prefetcher, extract_features, stream_features
from ocl.streams.protocols import Stream
from ocl.threads import torch_threads

log = logging.getLogger(__name__)


def _short(text: Any, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters: an error message must never carry a file's bytes."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s) - limit:,} more characters)"


def build(cfg: DictConfig, what: str, *args: Any, **kwargs: Any) -> Any:
    """:func:`build_node` of ``cfg[what]`` (a config group: ``stream``, ``protocol``, ``backbone``, ``learner``)."""
    return build_node(cfg.get(what), what, *args, **kwargs)


def build_node(node: Any, what: str, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node)`` with user errors surfaced as :class:`OCLError`.

    The node's options are checked first (:func:`check_options`); a ``_partial_`` factory
    is then called with ``args``/``kwargs``. Hydra wraps exceptions raised by the target; an
    :class:`OCLError` inside is re-raised as-is so the user reads our message, not a
    wrapper's. A constructor that rejects a value (``ValueError``/``TypeError``) becomes one line.
    """
    if node is None or "_target_" not in node:
        raise OCLError(f"config group '{what}' needs a `_target_` (e.g. {what}=<name>).")
    check_options(node, what, tuple(kwargs), len(args))
    try:
        obj = instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, (OCLError, OSError)):
            cause = cause.__cause__
        if isinstance(cause, OCLError):
            raise cause from None
        if isinstance(cause, OSError):  # a file the target could not read: name it
            raise OCLError(f"could not build `{what}` ({node.get('_target_')}): {describe_os_error(cause)}") from e
        raise OCLError(f"could not build `{what}` from its config ({node.get('_target_')}): {_short(e)}") from e
    if not (args or kwargs):
        return obj
    try:
        return obj(*args, **kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        name = getattr(getattr(obj, "func", obj), "__qualname__", node.get("_target_"))
        given = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
        raise OCLError(f"{what}: {name} refused its options {given}: {_short(e)}") from e


def seed_everything(seed: int) -> None:
    """Seed every global RNG a learner or library might use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_threads(threads: int | None) -> contextlib.AbstractContextManager[int]:
    """Run the block with ``threads`` torch intra-op threads (``None``: unchanged); restores
    the previous setting after. Yields the thread count in effect."""
    return torch_threads(threads, "threads")


@dataclass
class Features:
    """A source and the features of its splits: what every run on that source shares.

    Attributes:
        source: the loaded source (in a compare worker: its labels only, see
            :func:`ocl.streams.base.labels_only`).
        extractor: the backbone that made the features (``None`` in a compare worker: the
            parent extracted them).
        train: ``(n_train, D)`` features of ``source.train``.
        test: ``(n_test, D)`` features of ``source.test``, or ``None`` (no test split, or
            ``eval_test=false``).
        seconds: wall time of building the backbone and extracting (cache hits are fast).
    """

    source: Source
    extractor: Extractor | None
    train: np.ndarray
    test: np.ndarray | None
    seconds: float


@dataclass
class Prepared(Features):
    """:class:`Features` plus the stream of one run (``stream``: the protocol over ``source``).

    ``prefetch``: the background extraction of the features the run reads, when the cache
    had no complete entry (``train``/``test`` are then :class:`~ocl.streams.prefetch.LazyFeatures`);
    :meth:`close` it when the run ends."""

    stream: Stream
    prefetch: Prefetcher | None = None

    def close(self) -> None:
        """Stop the background extraction, if any (its finished shards stay in the cache)."""
        if self.prefetch is not None:
            self.prefetch.close()


def load_source(cfg: DictConfig) -> Source:
    """``cfg.stream`` built and wrapped as a :class:`~ocl.streams.base.Source`."""
    return to_source(build(cfg, "stream"), name=str(cfg.stream.get("name") or "custom"))


def make_stream(cfg: DictConfig, source: Source, seed: int) -> Stream:
    """``cfg.protocol`` over ``source`` with ``seed`` (class order, stream order, task split).

    Raises:
        OCLError: the protocol refuses its options, or makes an empty stream.
    """
    stream: Stream = build(cfg, "protocol", source, seed=seed)
    if len(stream) == 0:
        raise OCLError(f"the stream built from {source.name} is empty; nothing to learn from.")
    check_chunk_size(cfg, len(stream))
    return stream


def check_chunk_size(cfg: DictConfig, n_examples: int) -> None:
    """Refuse ``chunk_size`` larger than the stream: the whole stream would be one chunk, every
    prediction made before any learning (online accuracy 0 or chance), with no sign why."""
    chunk = cfg.get("chunk_size")
    if isinstance(chunk, int) and chunk > n_examples:
        raise OCLError(f"chunk_size={chunk} is larger than the stream ({n_examples:,} examples): every example "
                       f"would be predicted before anything was learned. Set chunk_size=C with C <= {n_examples:,} "
                       "(1, the default, is the per-example protocol).")


def extract(cfg: DictConfig, source: Source, extractor: Extractor | None = None) -> Features:
    """Extract (or load cached) features of both splits of ``source`` with ``cfg.backbone``
    (the test split only with ``eval_test=true``; ``extractor``: that backbone, if built already)."""
    t0 = time.perf_counter()
    if extractor is None:
        extractor = build(cfg, "backbone")
    cache = cfg.get("cache_dir")
    cache = os.path.expanduser(str(cache)) if cache else None
    progress = bool(cfg.get("progress", True))
    dtype = str(cfg.get("cache_dtype", "float32"))
    feats = {split: extract_features(images, extractor, cache, progress=progress, dtype=dtype)
             for split, images in feature_splits(cfg, source)}
    _no_test_note(cfg, source)
    return Features(source, extractor, feats["train"], feats.get("test"), time.perf_counter() - t0)


def _no_test_note(cfg: DictConfig, source: Source) -> None:
    if cfg.get("eval_test", True) and source.test is None:
        log.info("%s has no test split: skipping task-boundary evaluation (no accuracy matrix, forgetting or "
                 "final accuracy).", source.name)


def feature_splits(cfg: DictConfig, source: Source) -> list[tuple[str, ImageSet]]:
    """The splits whose features a run uses: ``train``, and ``test`` when there is one and
    ``eval_test`` is on (``ocl extract`` fills the cache with the same ones)."""
    splits: list[tuple[str, ImageSet]] = [("train", source.train)]
    if cfg.get("eval_test", True) and source.test is not None and len(source.test) > 0:
        splits.append(("test", source.test))
    return splits


def prepare(cfg: DictConfig) -> Prepared:
    """Build the source and its stream (seed ``cfg.seed``), then find its features: a protocol
    that refuses its options fails before any extraction.

    With a cache and a cached backbone, a complete cache entry is read as it is; otherwise
    only the images the stream reads (and the test images it evaluates) are extracted, in
    stream order, by a background thread ahead of the learner (:mod:`ocl.streams.prefetch`),
    into the cache's shards. The caller must :meth:`Prepared.close` the result."""
    source = load_source(cfg)
    stream = make_stream(cfg, source, int(cfg.seed))
    cache = cfg.get("cache_dir")
    if not cache:
        feats = extract(cfg, source)
        return Prepared(feats.source, feats.extractor, feats.train, feats.test, feats.seconds, stream)
    t0 = time.perf_counter()
    extractor: Extractor = build(cfg, "backbone")
    if not extractor.cacheable:
        feats = extract(cfg, source, extractor)
        return Prepared(feats.source, feats.extractor, feats.train, feats.test, feats.seconds, stream)
    found, prefetch = stream_features(feature_splits(cfg, source), stream, extractor, os.path.expanduser(str(cache)),
                                      str(cfg.get("cache_dtype", "float32")), bool(cfg.get("progress", True)))
    _no_test_note(cfg, source)
    return Prepared(source, extractor, found["train"], found.get("test"), time.perf_counter() - t0, stream, prefetch)


def with_defaults(node: DictConfig) -> DictConfig:
    """A learner node with every option its target takes: the node's values over the
    constructor's defaults (:func:`ocl.options.option_defaults`), in signature order.

    The learner configs state only what differs from the Python defaults; a run records (in
    ``results.json``'s config, a compare record's ``learner_config``) and ``resume=true``
    compares the complete set of options the learner ran with, so a changed default is seen.
    """
    defaults = option_defaults(node, LEARNER_ARGS)
    if not defaults:
        return node
    head = {k: node[k] for k in node if k in HYDRA_KEYS}
    return OmegaConf.merge(OmegaConf.create({**head, **defaults}), node)  # type: ignore[return-value]


def with_learner_defaults(cfg: DictConfig) -> DictConfig:
    """A copy of a run config whose ``learner`` node (if any) is :func:`with_defaults`'s: what a
    run records in its results and checkpoint. The caller's config is left as it was."""
    if cfg.get("learner") is None or "_target_" not in cfg.learner:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.learner = with_defaults(cfg.learner)
    return cfg


def make_learner(node: DictConfig, feature_dim: int, num_classes: int, seed: int, what: str = "learner") -> Learner:
    """Instantiate a learner config node (a ``_partial_`` factory, e.g. ``cfg.learner`` or
    :func:`learner_config`) for a stream of ``num_classes`` classes over ``feature_dim``-d features
    (``what``: its name in messages, e.g. ``learner.experts[1]`` for a pooled learner's expert)."""
    learner = build_node(node, what, feature_dim=feature_dim, num_classes=num_classes, seed=seed)
    if not isinstance(learner, Learner):
        raise OCLError(f"{what} `{node._target_}` must subclass ocl.learners.base.Learner.")
    return learner


# ---------------------------------------------------------------- the shipped learner configs


def available_learners() -> list[str]:
    """Names of the shipped learner configs (``configs/learner/<name>.yaml``), sorted."""
    folder = resources.files("ocl.configs").joinpath("learner")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


#: The learners that close a table, in this order: the network alone, the read-outs pooled
#: without it, and the default (the network pooled with them): what the network adds reads off
#: the last two rows.
_LAST = ("transformer", "readout_pool", "pooled")


def _table_order(name: str) -> tuple[int, bool, str]:
    # the baselines, then the Avalanche strategies (the peer implementation), then _LAST
    return (_LAST.index(name) + 1 if name in _LAST else 0), name.startswith("avalanche_"), name


#: What ``ocl compare learners=null`` runs: every shipped learner config, in table order
#: (the baselines, the Avalanche strategies, alphabetical within each; then the transformer and
#: the two pools).
ALL_LEARNERS: tuple[str, ...] = tuple(sorted(available_learners(), key=_table_order))


def learner_config(name: str, options: dict[str, Any] | None = None) -> DictConfig:
    """The ``learner`` node for ``name``: ``configs/learner/<name>.yaml`` with ``options`` merged
    in, or, for a name that is not shipped, ``options`` itself when it names a ``_target_``
    (your own learner: ``+learner_options.mine._target_=pkg.MyLearner``; ``_partial_`` defaults to true);
    every option the config leaves out filled in with its default (:func:`with_defaults`).

    Raises:
        OCLError: ``name`` is neither a shipped learner config nor given a ``_target_``
            (the message lists the valid names).
    """
    options = dict(options or {})
    valid = available_learners()
    if name not in valid:
        if "_target_" not in options:
            raise OCLError(f"unknown learner {name!r} in learners=[...]; valid learners: {', '.join(valid)} "
                           f"(or your own: +learner_options.{name}._target_=pkg.module.Class).")
        return with_defaults(OmegaConf.create({"_partial_": True, **options}))
    text = resources.files("ocl.configs").joinpath("learner", f"{name}.yaml").read_text()
    node = OmegaConf.create(text)
    if options:
        node = OmegaConf.merge(node, OmegaConf.create(options))
    return with_defaults(node)  # type: ignore[arg-type]
