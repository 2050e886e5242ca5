"""Command-line overrides checked against the composed config before hydra runs the command.

Hydra answers ``key=value`` for a key that does not exist with exit code 1 and the advice to
append it (``+learner.lrr=0.1``), which is wrong for a typo: the option would be ignored.
:func:`check_override_keys` answers instead with one line naming the nearest valid key
(``difflib``), or, for a real option of a learner's class that its config file does not
list, with the ``+`` form that sets it; and exit code 2, like every user error.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _nearest(key: str, node: Any) -> tuple[str | None, bool]:
    """The valid name under ``node`` nearest to ``key`` (None if none is close), and whether
    the config lists it (else it is an option of the node's class, set with a leading ``+``).
    The names are the node's keys and, for a ``_target_`` node, its class's options."""
    import difflib

    from ocl.options import HYDRA_KEYS, _options_of, _target_of

    listed = [str(k) for k in node] if isinstance(node, DictConfig) else []
    options: list[str] = []
    if isinstance(node, DictConfig) and "_target_" in node:
        found = _options_of(_target_of(node))
        options = list(found[1]) if found else []
    names = [n for n in dict.fromkeys(listed + options) if n not in HYDRA_KEYS]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return (close[0], close[0] in listed) if close else (None, True)


def unknown_key_message(cfg: DictConfig, key: str, value: str) -> str:
    """One line for ``key=value`` whose key is not in ``cfg`` (hydra's advice, ``+key=value``,
    is wrong for a typo): the nearest valid name, or how to add an option the config does not
    list (``+learner.momentum=0.9``) when ``key`` is a real option of the node's class."""
    from ocl.options import _options_of, _target_of

    parts = key.split(".")
    node: Any = cfg
    i = 0
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            break
        node = node[part]
    parent, name = ".".join(parts[:i]), parts[i]
    full = ".".join(parts[: i + 1])
    if i == len(parts) - 1 and isinstance(node, DictConfig) and "_target_" in node:
        found = _options_of(_target_of(node))
        if found and name in found[1]:  # a real option its config file does not list
            return (f"{key}: an option of {str(node['_target_']).rsplit('.', 1)[-1]} that its config does not "
                    f"list; add it with a leading +: +{key}={value}")
    msg = f"unknown config key `{full}` (in {key}={value})"
    close, listed = _nearest(name, node)
    if close is not None:
        fixed = ".".join([*parts[:i], close, *parts[i + 1:]])
        msg += f"; did you mean `{'.'.join([*parts[:i], close])}`? ({'' if listed else '+'}{fixed}={value})"
    names = [str(k) for k in node if not str(k).startswith("_")] if isinstance(node, DictConfig) else []
    if 0 < len(names) <= 30:
        msg += f"; keys {f'under `{parent}`' if parent else 'at the top level'}: {', '.join(names)}"
    return msg + "."


def check_override_keys(config_name: str, overrides: list[str]) -> None:
    """Compose the config as hydra will and refuse an override of a key that does not exist with
    one line naming the nearest valid key (exit code 2). Hydra's own answer (exit code 1) tells
    the user to append the key with ``+``, which turns a typo into a silently ignored option.
    Other composition errors are left to hydra, which reports them itself."""
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~", "hydra.", "hydra/"))]
    if not plain or any(o.startswith("-") for o in overrides):
        return
    kept = [o for o in overrides if not o.startswith(("hydra.", "hydra/"))]
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        for _ in range(len(kept) + 1):
            try:
                compose(config_name=config_name, overrides=kept)
                return
            except ConfigCompositionException as e:
                if not isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)):
                    return  # not an unknown key: hydra says what it is
                found = re.match(r"Could not override '([^']+)'", str(e))
                bad = next((o for o in kept if found and o.split("=", 1)[0] == found.group(1)), None)
                if bad is None:
                    return
            except Exception:  # any other problem: hydra reports it
                return
            rest = [o for o in kept if o != bad]
            try:
                cfg = compose(config_name=config_name, overrides=rest)
            except Exception:  # another override is bad too: report this one by its key alone
                cfg = OmegaConf.create()
            key, value = bad.split("=", 1)
            print(f"error: {unknown_key_message(cfg, key, value)}", file=sys.stderr)
            sys.exit(2)
