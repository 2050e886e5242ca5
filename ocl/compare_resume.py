"""``ocl compare ... resume=true``: keep the runs a comparison already finished, run the rest.

A comparison rewrites ``compare.json`` after every run (:mod:`ocl.compare`), so an
interrupted one (Ctrl-C, a crash, a killed job) leaves the records of the runs that had
finished. Started again in the same directory with ``resume=true``, it reads that file back,
checks that it was written by the same comparison, keeps the records of the runs that
finished ``ok`` and runs only the missing learner x seed runs and the failed ones. The
final ``compare.json`` (and CSV, plots) is the one an uninterrupted run would have written:
the same records, in table order (learners x seeds).

What must match (else the resume is refused, saying what differs, and nothing is changed):

- the resolved config, except :data:`FREE_KEYS`: how the runs are executed or shown
  (``workers``, ``engine``, ``threads``, ``plots``, ``backbone.threads``, ...) and which runs
  exist (``learners``, ``seeds``; checked run by run instead, below);
- the data and the backbone weights the features came from (fingerprints in ``setup``).

Run by run: a record is kept only if its learner's config (its shipped defaults merged with
``learner_options``) is the one it ran with; a learner whose config changed is run again,
with a warning. The comparison may add learners or seeds, never leave out a run that
finished: that would drop a result from ``compare.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from ocl.checkpoint import RESUME_FREE_KEYS, config_differences
from ocl.errors import OCLError

log = logging.getLogger(__name__)

COMPARE_JSON = "compare.json"

#: Top-level compare keys that may differ between a comparison and its resume.
FREE_KEYS = RESUME_FREE_KEYS | frozenset({
    "workers", "engine", "ray",  # where and how many runs go at once: a record does not depend on it
    "plots", "rank_by",  # outputs rebuilt from the records at the end
    "learners", "seeds", "seed", "learner_options",  # which runs, with which options: checked run by run
    "learner",  # `ocl run`'s learner group, unused by compare (each run's own learner config is checked)
    # how features are computed, not which: none of these is in the feature cache's key
    "backbone.threads", "backbone.batch_size", "backbone.device", "backbone.channels_last",
})

Job = tuple[str, int]


def _hint(out_dir: Path) -> str:
    return f"ocl compare <the same overrides> resume=true hydra.run.dir={out_dir}"


def previous_comparison(out_dir: Path, resume: bool) -> dict[str, Any] | None:
    """The ``compare.json`` payload already in ``out_dir``, or ``None`` when there is none.

    Raises:
        OCLError: there is one but ``resume`` is false (it would be overwritten), or it
            cannot be read as a comparison's results.
    """
    path = Path(out_dir) / COMPARE_JSON
    if not path.exists():
        if resume:
            log.info("resume=true: %s has no %s yet; running every run", out_dir, COMPARE_JSON)
        return None
    if not resume:
        raise OCLError(f"{out_dir} already holds the results of an earlier comparison ({COMPARE_JSON}); nothing "
                       f"was changed. Continue it (run only what is missing) with: {_hint(out_dir)}, or start a new "
                       "one in another directory (hydra.run.dir=DIR).")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OCLError(f"cannot resume from {path}: not readable as JSON ({e}). Move it away to start the "
                       "comparison afresh, or use another directory (hydra.run.dir=DIR).") from e
    if not (isinstance(payload, dict) and isinstance(payload.get("records"), list)
            and isinstance(payload.get("config"), dict) and isinstance(payload.get("setup"), dict)):
        raise OCLError(f"cannot resume from {path}: not the results of an ocl comparison (no records, setup and "
                       "config). Use another directory (hydra.run.dir=DIR).")
    return payload


def check_same_config(previous: Mapping[str, Any], config: dict[str, Any], out_dir: Path) -> None:
    """Refuse to resume when the resolved config differs outside :data:`FREE_KEYS`."""
    diff = config_differences(previous["config"], config, FREE_KEYS)
    if diff:
        raise OCLError(f"cannot resume the comparison in {out_dir}: the config differs from the one in its "
                       f"{COMPARE_JSON}:\n  " + "\n  ".join(diff)
                       + "\nResume with the original settings, or start a new comparison in another directory "
                       "(hydra.run.dir=DIR).")


def kept_records(previous: Mapping[str, Any], jobs: Sequence[Job], learner_configs: Mapping[str, Any],
                 out_dir: Path) -> dict[Job, dict[str, Any]]:
    """The records of ``previous`` to keep: finished ``ok``, in ``jobs``, and run with the
    learner config they would run with now (``learner_configs[name]``, resolved to plain data).

    Raises:
        OCLError: a run that finished is not in ``jobs`` (resuming would drop its result).
    """
    wanted = set(jobs)
    ok = {(str(r.get("learner")), r.get("seed")): r for r in previous["records"]
          if isinstance(r, dict) and r.get("status") == "ok"}
    dropped = sorted(job for job in ok if job not in wanted)
    if dropped:
        names = ", ".join(f"{n} seed {s}" for n, s in dropped[:6]) + (" ..." if len(dropped) > 6 else "")
        raise OCLError(f"cannot resume the comparison in {out_dir}: it has finished runs that learners=/seeds= now "
                       f"leave out ({names}); resuming would drop them from {COMPARE_JSON}. Name every learner and "
                       "seed it ran (more may be added), or start a new comparison in another directory "
                       "(hydra.run.dir=DIR).")
    kept: dict[Job, dict[str, Any]] = {}
    changed: dict[str, list[str]] = {}
    for job, rec in ok.items():
        name = job[0]
        diff = config_differences(rec.get("learner_config") or {}, learner_configs[name], frozenset())
        if diff:
            changed.setdefault(name, diff)
        else:
            kept[job] = rec
    for name, diff in changed.items():
        log.warning("resume: the config of %s changed since its runs in %s (%s): they run again", name, out_dir,
                    "; ".join(diff[:5]) + ("; ..." if len(diff) > 5 else ""))
    failed = sum(1 for r in previous["records"] if isinstance(r, dict) and r.get("status") != "ok")
    log.info("resume: %d of %d runs kept from %s; %d to run (%d had failed)", len(kept), len(jobs),
             Path(out_dir) / COMPARE_JSON, len(jobs) - len(kept), failed)
    return kept


def check_same_inputs(previous: Mapping[str, Any], setup: Mapping[str, Any], out_dir: Path) -> None:
    """Refuse to resume when the data or the backbone weights differ from the kept runs'
    (the config can match while the files behind a path changed)."""
    before, now = previous["setup"], setup
    what = []
    if before.get("data_fingerprint") != now.get("data_fingerprint"):
        what.append("the data (its files changed, or another copy is read)")
    if (before.get("backbone") or {}).get("weights_sha1") != (now.get("backbone") or {}).get("weights_sha1"):
        what.append("the backbone weights")
    elif before.get("feature_key") != now.get("feature_key"):  # e.g. precision=auto on another device
        what.append("the features (the backbone's settings as the feature cache keys them)")
    if before.get("feature_dim") != now.get("feature_dim"):
        what.append(f"the feature size (D={before.get('feature_dim')} -> {now.get('feature_dim')})")
    if what:
        raise OCLError(f"cannot resume the comparison in {out_dir}: the config matches, but {' and '.join(what)} "
                       f"differ from the finished runs' in its {COMPARE_JSON}. Restore them, or start a new "
                       "comparison in another directory (hydra.run.dir=DIR).")
