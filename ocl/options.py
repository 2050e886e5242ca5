"""A config's values, checked before anything is built.

Hydra checks the names of top-level keys; everything else arrives as whatever the command
line parsed. These checks turn a mistyped option (``+learner.lrr=0.1``), a value of the
wrong kind (``learner.lr=abc``, ``seed=-1``) or a required setting left out (``???``) into
one clear :class:`~ocl.errors.OCLError`, before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from typing import Any, Sequence

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from ocl.errors import OCLError
from ocl.files import check_writable_dir
from ocl.streams.cache import STORAGE_DTYPES
from ocl.tracker import NearFutureTracker


#: What the runner passes to every learner factory itself (``factory(feature_dim=D, num_classes=K, seed=s)``).
LEARNER_ARGS: tuple[str, ...] = ("feature_dim", "num_classes", "seed")
#: The keys of a config node that are hydra's, not the target's options.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})


def _nonnegative(key: str) -> bool:
    """Options that must not be negative whatever the target: step sizes and penalties."""
    return key in ("lr", "weight_decay", "momentum") or key.endswith("_lr")


def _positive(key: str) -> bool:
    """Integer options that must be >= 1 whatever the target: sizes and counts (an image side
    of 0 used to run silently at the model's default size, -5 was a traceback)."""
    return key in ("image_size", "batch_size")


def _target_of(node: Any) -> Any:
    try:
        return get_object(str(node["_target_"]))
    except Exception:  # hydra says what is wrong with a target it cannot import, when building
        return None


def _simple_types(hint: Any) -> set[type] | None:
    """The scalar types a type hint allows (``float | None`` -> {float, NoneType}), or None
    when the hint is anything else (containers, classes: not checked here)."""
    scalars = (float, int, bool, str, type(None))
    if hint in scalars:
        return {hint}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if all(a in scalars for a in args):
            return set(args)
    return None


def _check_value(what: str, key: str, value: Any, hint: Any) -> None:
    allowed = _simple_types(hint)
    if allowed is None or str in allowed:  # a string option takes what the command line made of it
        return
    number = float in allowed
    if value is None:
        ok = type(None) in allowed
    elif isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or number
    elif isinstance(value, float):
        ok = number and math.isfinite(value)
    else:
        ok = False
    if ok and _nonnegative(key) and isinstance(value, (int, float)) and value < 0:
        raise OCLError(f"{what}.{key}={value!r}: must be >= 0.")
    if ok and _positive(key) and isinstance(value, (int, float)) and value < 1:
        raise OCLError(f"{what}.{key}={value!r}: must be a positive integer"
                       f"{' or null' if type(None) in allowed else ''}. Set it as {what}.{key}=VALUE.")
    if not ok:
        kinds = [k for t, k in ((float, "a finite number"), (int, "an integer"), (bool, "true or false"))
                 if t in allowed and not (t is int and number)]
        if type(None) in allowed:
            kinds.append("null")
        raise OCLError(f"{what}.{key}={value!r}: must be {' or '.join(kinds)}. Set it as {what}.{key}=VALUE.")


def _options_of(target: Any) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
    """``(signature parameters, {option name: default}, type hints)`` of a config target: the
    options of its signature, or, for a constructor taking ``**options``, the fields of the
    dataclass it names as ``options``; ``None`` when they cannot be known. A default is
    ``inspect.Parameter.empty`` or ``dataclasses.MISSING`` where there is none."""
    if target is None:
        return None
    try:
        params = inspect.signature(target).parameters
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except (TypeError, ValueError, NameError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        spec = getattr(target, "options", None)
        if not dataclasses.is_dataclass(spec):
            return None
        return params, {f.name: f.default for f in dataclasses.fields(spec)}, {**hints, **typing.get_type_hints(spec)}
    return params, {k: p.default for k, p in params.items() if k != "self"}, hints


def option_defaults(node: Any, runner_args: Sequence[str] = ()) -> dict[str, Any]:
    """The default of every option of ``node``'s ``_target_`` that has a plain one (a number,
    a string, a bool or None), in signature order, without ``runner_args``: what the target
    runs with when the config does not say. The constructor (or its options dataclass) is the
    one place a default is written; a config states only what differs."""
    found = _options_of(_target_of(node))
    if found is None:
        return {}
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in found[1].items() if k not in runner_args and isinstance(v, plain)}


def check_options(node: Any, what: str, runner_args: Sequence[str] = (), n_args: int = 0) -> None:
    """Check a config node's options against the signature of its ``_target_`` before anything
    is built: a mistyped name (``+learner.lrr=0.1``) and a value of the wrong kind
    (``learner.lr=abc``, ``learner.lr=nan``, ``learner.window=abc``, ``learner.lr=-1``) are
    one clear :class:`OCLError` instead of a constructor's traceback.

    Names come from the signature, or for a constructor taking ``**options`` from the dataclass
    it names as ``options`` (e.g. the transformer's ``TransformerConfig``); values are checked
    against scalar type hints (``float`` options must be finite; options named ``lr``,
    ``*_lr``, ``weight_decay``, ``momentum`` must be >= 0).

    Args:
        node: the config node (``_target_`` + options).
        what: its name in messages (``learner``, ``learner_options.mlp``).
        runner_args: keyword arguments the runner passes itself (not options).
        n_args: positional arguments the runner passes first (a protocol's ``source``).
    """
    target = _target_of(node)
    found = _options_of(target)
    if found is None:
        return  # not introspectable, or a target that validates its own **options
    params, defaults, hints = found
    names = list(defaults)
    given = [k for k in node if k not in HYDRA_KEYS]
    unknown = sorted(set(given) - set(names))
    if unknown:
        positional = [k for k in params if k != "self"][:n_args]
        valid = sorted(set(names) - set(runner_args) - set(positional))
        close = difflib.get_close_matches(unknown[0], valid, n=1, cutoff=0.6)
        hint = f"did you mean {what}.{close[0]}? " if close else ""
        example = close[0] if close else valid[0] if valid else "x"
        raise OCLError(
            f"{what}: unknown option(s) {unknown} for {getattr(target, '__qualname__', target)}; {hint}"
            f"valid options: {valid}. Fix the spelling of the override (e.g. {what}.{example}=...)."
        )
    for key in given:
        _check_value(what, key, node[key], hints.get(key))


#: Top-level run settings: (check, what a valid value is). Hydra checks key names (a mistyped key
#: is an error there); values arrive as whatever the command line parsed, so check them here.
#: Seeds go to torch (which takes at most 2**64 - 1) and numpy (which refuses negative ones).
MAX_SEED = 2**64 - 1
_RUN_KEYS: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED,
             f"an integer in [0, {MAX_SEED}] (2**64 - 1, the largest seed torch takes)"),
    "chunk_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "curve_window": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "threads": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                "an integer >= 1 or null"),
    "checkpoint_every": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                         "a number of examples >= 1, or null (only at the end and on Ctrl-C)"),
    "eval_test": (lambda v: isinstance(v, bool), "true or false"),
    "progress": (lambda v: isinstance(v, bool), "true or false"),
    "resume": (lambda v: isinstance(v, bool), "true or false"),
    "cache_dtype": (lambda v: v in STORAGE_DTYPES, " or ".join(STORAGE_DTYPES)),
}


def check_run_config(cfg: DictConfig) -> None:
    """Raise :class:`OCLError` naming a required setting that was not given (``???`` in the
    configs, e.g. ``stream.path`` of ``stream=arrays``), or the first top-level setting with
    an invalid value (including a ``cache_dir`` that is a file or not writable)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise OCLError(f"{', '.join(missing)}: required but not given; set {'it' if len(missing) == 1 else 'them'} "
                       f"on the command line, e.g. {missing[0]}=VALUE.")
    for key, (ok, what) in _RUN_KEYS.items():
        if key in cfg and not ok(cfg[key]):
            raise OCLError(f"{key}={cfg[key]!r}: must be {what}. Set it as {key}=VALUE on the command line "
                           "(see configs/config.yaml).")
    make_near_future(cfg)
    cache = cfg.get("cache_dir")
    if cache:
        check_writable_dir(os.path.expanduser(str(cache)), "the feature cache directory (cache_dir)",
                           "set cache_dir=DIR to another directory, or cache_dir=null to not cache features")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def make_near_future(cfg: DictConfig) -> NearFutureTracker | None:
    """The near-future evaluation ``cfg.near_future`` asks for (``offset`` S, ``every`` m), or
    ``None`` when it is off (``near_future.every=null``, or no ``near_future`` node).

    Raises:
        OCLError: S is not an integer >= 0, or m not an integer >= 1 or null.
    """
    node = cfg.get("near_future")
    if node is None:
        return None
    if not isinstance(node, DictConfig):
        raise OCLError(f"near_future={node!r}: set its keys instead, e.g. near_future.offset=100 "
                       "near_future.every=20 (near_future.every=null turns it off).")
    offset, every = node.get("offset"), node.get("every")
    if not _is_int(offset) or offset < 0:
        raise OCLError(f"near_future.offset={offset!r}: must be an integer >= 0 (S, how many steps past the "
                       "next one the evaluated example lies; see configs/config.yaml).")
    if every is None:
        return None
    if not _is_int(every) or every < 1:
        raise OCLError(f"near_future.every={every!r}: must be an integer >= 1 (steps between near-future "
                       "evaluations), or null to turn them off.")
    return NearFutureTracker(offset, every)


#: The config groups built from ``_target_`` nodes: what the runner passes each factory itself
#: (keyword names, number of positional arguments).
GROUPS: dict[str, tuple[tuple[str, ...], int]] = {
    "stream": ((), 0), "protocol": (("seed",), 1), "backbone": ((), 0), "learner": (LEARNER_ARGS, 0),
}


def check_groups(cfg: DictConfig, groups: Sequence[str] = tuple(GROUPS)) -> None:
    """:func:`check_options` on each config group's node, before anything slow is built."""
    for what in groups:
        node = cfg.get(what)
        if node is not None and "_target_" in node:
            check_options(node, what, *GROUPS[what])

