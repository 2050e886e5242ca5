"""``engine=ray``: the Ray session, and a comparison's learner x seed runs as Ray tasks.

Ray is an optional extra (``pip install -e ".[ray]"``); every entry point here goes through
:func:`require_ray`, which turns its absence into an :class:`OCLError` saying how to install
it. :func:`ray_session` connects to the cluster named by ``ray.address`` or starts a local
one with ``ray.num_cpus`` CPUs, and shuts down only what it started.

:func:`run_ray` is the ``engine=ray`` counterpart of :func:`ocl.workers.run_parallel`: the
same prepared inputs (:func:`ocl.jobs.shared_features`: the resolved config, a
labels-only source and the paths of the feature files, so every node must see the feature
cache, or the run directory, on shared storage), the same job function
(:func:`ocl.jobs.run_shipped`, i.e. :func:`ocl.jobs.run_guarded`), so the records are those
of a serial run. Ray knows which task a dead worker was running, so a lost run is marked
failed on the spot (after ``ray.max_retries`` retries); Ctrl-C cancels every task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from ocl.errors import OCLError

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
INSTALL = 'pip install -e ".[ray]" (in a checkout of ocl; or: pip install "ray[data]")'


def check_engine(value: Any) -> str:
    """``engine=`` as one of :data:`ENGINES`; ``ray`` only when Ray can be imported."""
    if value not in ENGINES:
        raise OCLError(f"engine={value!r}: must be one of {', '.join(ENGINES)} (local: this machine; "
                       "ray: a Ray cluster, see ray.* in configs/ray/default.yaml).")
    if value == "ray":
        require_ray()
    return str(value)


def require_ray() -> ModuleType:
    """The ``ray`` module (with Ray Data), or :class:`OCLError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ocl extract needs it; `pip install ray` alone lacks pyarrow)
    except ImportError as e:
        raise OCLError(f"engine=ray needs Ray, which is not installed ({e}). Install it with {INSTALL}, "
                       "or use engine=local.") from e
    return ray


def _count(rcfg: Any, key: str, minimum: float = 0) -> Any:
    v = rcfg.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum):
        raise OCLError(f"ray.{key}={v!r}: must be a number >= {minimum} (or null); see configs/ray/default.yaml.")
    return v


def check_ray_config(rcfg: Any) -> None:
    """Raise :class:`OCLError` naming the first ``ray.*`` setting with an invalid value."""
    for key, minimum in (("num_cpus", 1), ("max_retries", 0), ("task_cpus", 0), ("task_gpus", 0),
                         ("extract_workers", 1), ("extract_cpus", 0), ("extract_gpus", 0), ("shard_size", 1)):
        _count(rcfg, key, minimum)
    for key in ("max_retries", "extract_workers", "shard_size", "num_cpus"):
        v = rcfg.get(key)
        if v is not None and int(v) != v:
            raise OCLError(f"ray.{key}={v!r}: must be an integer.")


def _runtime_env(rcfg: Any) -> dict[str, Any]:
    """``ray.runtime_env``, with the working directory on the workers' PYTHONPATH: a module next
    to the command (``+learner_options.mine._target_=my_module.Mine``) imports in a Ray worker
    as it does here (on other nodes, when the directory is on shared storage)."""
    env = OmegaConf.to_container(rcfg.runtime_env, resolve=True) if rcfg.get("runtime_env") else {}
    env_vars = dict(env.get("env_vars") or {})
    paths = [os.getcwd(), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env_vars.setdefault("PYTHONPATH", os.pathsep.join(paths))
    return {**env, "env_vars": env_vars}


@contextlib.contextmanager
def ray_session(rcfg: Any) -> Iterator[ModuleType]:
    """Yield ``ray``, initialised: on the cluster at ``ray.address`` if set, else on a local
    cluster of ``ray.num_cpus`` CPUs (all of this machine's when null), shut down on exit.
    A session that is already up (a script, a notebook, the tests) is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = rcfg.get("address")
    kwargs: dict[str, Any] = {"runtime_env": _runtime_env(rcfg), "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=str(address), **kwargs)
        else:
            ray.init(num_cpus=rcfg.get("num_cpus"), include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"connect to the Ray cluster at ray.address={address}" if address else "start a local Ray cluster"
        raise OCLError(f"could not {where}: {e}") from e
    log.info("ray: %s", ray.cluster_resources())
    try:
        yield ray
    finally:
        ray.shutdown()


def lost_reason(e: BaseException) -> str:
    """One line for a record whose Ray task did not return."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return (f"its Ray worker died or was lost during the run ({type(e).__name__}: {first}); "
            "rerun it with engine=local to see more")


def run_ray(cfg: DictConfig, feats: Any, learners: dict[str, DictConfig], jobs: Sequence[tuple[str, int]],
            out_dir: Path) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` (learner, seed) as Ray tasks of ``ray.task_cpus`` CPUs and ``ray.task_gpus``
    GPUs each; yield each record as it finishes (completion order). A task whose worker dies
    (killed for memory, a lost node) gets a ``failed`` record, the others go on; leaving early
    (Ctrl-C, an error) cancels every task not yet finished."""
    from ocl.jobs import failed_record, remove_work_dirs, run_shipped, shared_features

    rcfg = cfg.ray
    with ray_session(rcfg) as ray, shared_features(cfg, feats, learners, out_dir) as ship:
        task = ray.remote(run_shipped).options(num_cpus=rcfg.task_cpus, num_gpus=rcfg.task_gpus,
                                        max_retries=int(rcfg.max_retries), retry_exceptions=False)
        source = ray.put(ship.source)  # once, not once per task: the labels of a big stream are big
        refs = {task.remote(ship.plain, source, ship.train, ship.test, name, seed, ship.learners[name],
                            str(ship.out_dir), ship.tensorboard, str(ship.scratch / f"started-{uuid.uuid4().hex}")):
                (name, seed) for name, seed in jobs}
        log.info("%d runs as Ray tasks (%s CPU, %s GPU each)", len(refs), rcfg.task_cpus, rcfg.task_gpus)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    name, seed = refs[ref]
                    try:
                        rec = ray.get(ref)
                    except ray.exceptions.RayError as e:  # run_guarded catches the learner's own errors
                        log.error("%s (seed %d): %s", name, seed, lost_reason(e))
                        remove_work_dirs(ship.out_dir, name, seed)
                        rec = failed_record(name, seed, lost_reason(e))
                    yield rec
        except BaseException:
            for ref in pending:  # Ctrl-C, or the consumer stopped: no task computes what nobody reads
                ray.cancel(ref, force=True)
            raise
