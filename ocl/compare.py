"""``ocl compare``: several learners x several seeds on one stream.

The source is loaded and its features extracted **once** (train and test split); every
learner and seed then runs prequentially over the same cached features. The protocol
(stream order, class order, task split) is rebuilt per seed, so the seeds vary the
stream as well as the learners' own randomness, exactly as ``ocl run seed=s`` would.

Each learner x seed run is a job (:mod:`ocl.jobs`). With ``workers=N`` the jobs go to N
spawned processes (:mod:`ocl.workers`), with ``engine=ray`` to Ray tasks
(:mod:`ocl.ray_engine`); every engine runs the same :func:`ocl.jobs.run_guarded` on the same
features, so records are identical whichever runs them.

Outputs in the run directory (rewritten after every run, so a crash or Ctrl-C keeps
what finished; ``resume=true`` in the same directory then runs only what is missing,
see :mod:`ocl.compare_resume`): ``compare.json`` (one record per learner x seed, plus a per-learner
summary), ``compare.csv`` (the same records, scalar metrics only), ``curves.png`` and
``acc_matrix.png`` (see :mod:`ocl.plots`), and with ``tensorboard=true`` event files
under ``tensorboard/<learner>/seed<s>``.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from ocl import compare_resume
from ocl.build import (ALL_LEARNERS, Features, available_learners, extract, learner_config, load_source, make_stream,
                       with_learner_defaults)
from ocl.errors import OCLError
from ocl.files import atomic_file
from ocl.jobs import METRICS, run_guarded, tensorboard_writer_class
from ocl.options import LEARNER_ARGS, MAX_SEED, check_groups, check_options, check_run_config, make_near_future
from ocl.ray_engine import check_engine, check_ray_config, run_ray
from ocl.report import format_table, weights_label, write_json_atomic
from ocl.rundir import RunDir, claim
from ocl.workers import check_workers, run_parallel

log = logging.getLogger(__name__)

#: Metrics where smaller is better (the table ranks them ascending).
LOWER_IS_BETTER = frozenset({"cumulative_log_loss", "mean_log_loss", "near_future_mean_log_loss", "forgetting",
                             "learn_seconds", "eval_seconds"})

#: Table columns: (metric, header).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("avg_online_accuracy", "online acc"),
    ("near_future_accuracy", "near-future acc"),
    ("mean_log_loss", "mean log-loss"),
    ("final_avg_accuracy", "final acc"),
    ("forgetting", "forgetting"),
    ("examples_per_second", "ex/s"),
)


def resolve_learners(value: Any, options: Any = None) -> list[str]:
    """``learners=`` as a list of names: ``None`` means :data:`ocl.build.ALL_LEARNERS` (every shipped config);
    a string may name one learner or several separated by commas. A name that is not
    shipped is valid when ``options[name]`` gives its ``_target_``."""
    if value is None:
        names = list(ALL_LEARNERS)
    elif isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple, ListConfig)):
        names = [str(v).strip() for v in value]
    else:
        raise OCLError(f"learners={value!r}: expected a list of learner names, e.g. learners=[linear,knn].")
    if not names:
        raise OCLError("learners=[]: name at least one learner (or leave learners unset for all of them).")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OCLError(f"learners: {dupes} listed more than once.")
    valid = available_learners()
    options = options or {}
    unknown = [n for n in names if n not in valid and "_target_" not in (options.get(n) or {})]
    if unknown:
        raise OCLError(f"unknown learner(s) {unknown} in learners=[...]; valid learners: {', '.join(valid)} "
                       f"(or your own: +learner_options.{unknown[0]}._target_=pkg.module.Class).")
    return names


def resolve_seeds(value: Any, base_seed: int) -> list[int]:
    """``seeds=N`` -> ``[base_seed, ..., base_seed + N - 1]``; ``seeds=[a,b]`` -> those seeds."""
    if isinstance(value, bool):
        raise OCLError(f"seeds={value!r}: must be a number of seeds >= 1 or a list of seeds.")
    if isinstance(value, int):
        if value < 1:
            raise OCLError(f"seeds={value}: must be >= 1 (the number of seeds per learner).")
        if base_seed + value - 1 > MAX_SEED:
            raise OCLError(f"seed={base_seed} seeds={value}: the last seed would pass {MAX_SEED} (2**64 - 1, the "
                           "largest seed torch takes); lower seed.")
        return [base_seed + i for i in range(value)]
    if isinstance(value, (list, tuple, ListConfig)) and value:
        seeds = list(value)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
            raise OCLError(f"seeds={list(value)!r}: a list of seeds must hold distinct integers.")
        if not all(0 <= s <= MAX_SEED for s in seeds):
            raise OCLError(f"seeds={list(value)!r}: every seed must be in [0, {MAX_SEED}].")
        return [int(s) for s in seeds]
    raise OCLError(f"seeds={value!r}: must be a number of seeds >= 1 or a list of distinct integers.")


def _check_compare_config(cfg: DictConfig, learners: Sequence[str]) -> None:
    rank_by = cfg.get("rank_by", "avg_online_accuracy")
    if rank_by not in METRICS:
        raise OCLError(f"rank_by={rank_by!r}: must be one of {', '.join(METRICS)}.")
    for key in ("tensorboard", "plots"):
        if not isinstance(cfg.get(key, False), bool):
            raise OCLError(f"{key}={cfg.get(key)!r}: must be true or false.")
    options = cfg.get("learner_options") or {}
    extra = sorted(set(options) - set(learners))
    if extra:
        raise OCLError(f"learner_options names {extra}, which are not in learners={list(learners)}.")


def _mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """Mean and sample std (ddof=1; nan with one value) of the finite values, and their count."""
    v = np.array([x for x in values if x is not None and math.isfinite(float(x))], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def aggregate(records: Sequence[dict[str, Any]], learners: Sequence[str], rank_by: str) -> list[dict[str, Any]]:
    """Per-learner mean ± std over seeds, ranked by ``rank_by`` (best first; learners whose
    every run failed, or without the metric, last)."""
    out = []
    for name in learners:
        recs = [r for r in records if r["learner"] == name]
        ok = [r for r in recs if r["status"] == "ok"]
        row: dict[str, Any] = {"learner": name, "runs": len(recs), "ok": len(ok),
                               "errors": sorted({r["error"] for r in recs if r["status"] != "ok"}),
                               "mean": {}, "std": {}}
        for m in METRICS:
            row["mean"][m], row["std"][m], _ = _mean_std(r.get(m) for r in ok)
        out.append(row)
    sign = 1.0 if rank_by in LOWER_IS_BETTER else -1.0

    def key(row: dict[str, Any]) -> tuple[int, float]:
        v = row["mean"][rank_by]
        return (1, 0.0) if math.isnan(v) else (0, sign * v)

    out.sort(key=key)  # stable: ties keep the learners' order
    for i, row in enumerate(out, 1):
        row["rank"] = i
    return out


def format_cell(mean: float, std: float, metric: str) -> str:
    """``0.8123 ± 0.0040`` (``1,234 ± 56`` for ex/s; ``-`` when undefined; no ± with one seed)."""
    if math.isnan(mean):
        return "-"
    if metric == "examples_per_second":
        return f"{mean:,.0f}" + ("" if math.isnan(std) else f" ± {std:,.0f}")
    return f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")


def ranked_table(payload: dict[str, Any]) -> str:
    """The table ``ocl compare`` prints: one row per learner, mean ± std over seeds, ranked."""
    rows = []
    for row in payload["summary"]:
        cells = [format_cell(row["mean"][m], row["std"][m], m) for m, _ in TABLE_COLUMNS]
        seeds = f"{row['ok']}/{row['runs']}" + ("" if row["ok"] == row["runs"] else " FAILED")
        rows.append([row["rank"], row["learner"], *cells, seeds])
    headers = ("#", "learner", *(h for _, h in TABLE_COLUMNS), "seeds ok")
    s = payload["setup"]
    rank_by = payload["rank_by"]
    direction = "lower" if rank_by in LOWER_IS_BETTER else "higher"
    head = (f"{s['stream']} / {s['protocol']}: {s['n_examples']} examples, {s['n_tasks']} tasks, "
            f"{s['num_classes']} classes; backbone {s['backbone'].get('model', '-')} "
            f"(weights: {weights_label(s['backbone'])}, D={s['feature_dim']}); "
            f"seeds {s['seeds']}; ranked by {rank_by} ({direction} is better; mean ± std over seeds)")
    lines = [head, format_table(rows, headers=headers, align="rl" + "r" * (len(headers) - 2))]
    nf = s.get("near_future")
    lines.append("near-future acc: off (near_future.every=null)" if nf is None else
                 f"near-future acc: the learner after step t scores the unseen x_(t+1+S), S={nf['offset']}, "
                 f"every {nf['every']} steps ({nf['evaluations']} evaluations per run)")
    if s["backbone"].get("weights") == "random":
        lines.append("WARNING: the backbone has RANDOM weights (backbone.weights=random); these are not pretrained features.")
    for row in payload["summary"]:
        for err in row["errors"]:
            lines.append(f"{row['learner']} failed: {err}")
    lines.append(f"results: {payload['out_dir']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- outputs


def write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """``compare.csv``: one row per learner x seed with the scalar metrics (empty = undefined)."""
    cols = ["learner", "seed", "status", *METRICS, "near_future_offset", "near_future_every", "error"]
    with atomic_file(path, "w") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in records:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])


def _payload(cfg: DictConfig, feats: Features, learners: list[str], seeds: list[int], records: list[dict[str, Any]],
             out_dir: Path, complete: bool, data_fingerprint: dict[str, str | None] | None = None) -> dict[str, Any]:
    rank_by = str(cfg.get("rank_by", "avg_online_accuracy"))
    return {
        "complete": complete,
        "rank_by": rank_by,
        "out_dir": str(out_dir),
        "setup": _setup(cfg, feats, learners, seeds, records, data_fingerprint),
        "summary": aggregate(records, learners, rank_by),
        "records": records,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _setup(cfg: DictConfig, feats: Features, learners: list[str], seeds: list[int], records: list[dict[str, Any]],
           data_fingerprint: dict[str, str | None] | None) -> dict[str, Any]:
    """What was compared: stream, backbone (with its weights), the data's fingerprints, learners, seeds."""
    first = next((r for r in records if r["status"] == "ok"), None)
    info = feats.extractor.info if feats.extractor is not None else {"model": "pixels", "weights": "none"}
    nf = make_near_future(cfg)
    return {
        "stream": feats.source.name,
        "protocol": str(cfg.protocol.get("_target_", "?")).rsplit(".", 1)[-1],
        "n_examples": first["n_examples"] if first else None,
        "n_tasks": first["n_tasks"] if first else None,
        "num_classes": first["num_classes"] if first else None,
        "feature_dim": int(feats.train.shape[1]),
        "backbone": info,
        "data_fingerprint": data_fingerprint,
        "feature_key": feats.extractor.key() if feats.extractor is not None else None,  # what the cache keys on
        "feature_seconds": feats.seconds,
        "learners": learners,
        "seeds": seeds,
        "chunk_size": int(cfg.chunk_size),
        "near_future": None if nf is None else {"offset": nf.offset, "every": nf.every,
                                                "evaluations": first["near_future_evaluations"] if first else None},
        # sparse label ids renumbered to classes 0..K-1: class i was label label_map[i]
        **({} if feats.source.label_map is None else {"label_map": feats.source.label_map}),
    }


def run_compare(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run every learner in ``cfg.learners`` with every seed of ``cfg.seeds`` on the stream of ``cfg``.

    Args:
        cfg: a composed ``compare`` config (``configs/compare.yaml``: the run config plus
            ``learners``, ``seeds``, ``rank_by``, ``learner_options``, ``tensorboard``, ``plots``).
        out_dir: the run directory (created if missing). With ``cfg.resume`` it may hold an
            earlier comparison's ``compare.json``: its finished runs are kept and only the
            missing (or failed) learner x seed runs run (:mod:`ocl.compare_resume`); without
            it, a ``compare.json`` there is refused, not overwritten.

    Returns:
        The ``compare.json`` payload: ``records`` (one per learner x seed, each with
        ``learner``, ``seed``, ``status`` ("ok"/"failed"), ``error`` and the metrics of
        :data:`ocl.jobs.METRICS`), ``summary`` (ranked mean/std per learner), ``setup``, ``config``.

    Raises:
        OCLError: a bad setting or a stream/backbone problem, or a resume that does not
            match the earlier comparison (before any learner runs). A learner that fails
            does not raise: its record is marked ``failed``.
    """
    check_run_config(cfg)
    check_groups(cfg, ("stream", "protocol", "backbone"))  # `learner` is not used here
    learners = resolve_learners(cfg.get("learners"), cfg.get("learner_options"))
    seeds = resolve_seeds(cfg.get("seeds", 1), int(cfg.seed))
    _check_compare_config(cfg, learners)
    writer_class = tensorboard_writer_class() if cfg.get("tensorboard", False) else None
    workers = check_workers(cfg.get("workers", 1))
    engine = check_engine(cfg.get("engine", "local"))
    if engine == "ray":
        check_ray_config(cfg.ray)
        if workers != 1:
            raise OCLError(f"workers={workers} is for engine=local; with engine=ray the cluster's CPUs set how many "
                           "runs go at once (ray.num_cpus / ray.task_cpus).")
    options = cfg.get("learner_options") or {}
    nodes = {name: learner_config(name, options.get(name)) for name in learners}  # each learner's config, once
    for name, node in nodes.items():  # every learner config parses and its options check out before the slow extraction
        check_options(node, f"learner_options.{name}", LEARNER_ARGS)
    cfg = with_learner_defaults(cfg)  # unused here, but recorded in the config (as `ocl run` records it)
    with claim(out_dir) as rd:
        return _compare_owned(cfg, rd, nodes, seeds, workers, engine, writer_class)


def _compare_owned(cfg: DictConfig, rd: RunDir, nodes: dict[str, DictConfig], seeds: list[int], workers: int,
                   engine: str, writer_class: Any) -> dict[str, Any]:
    out_dir = rd.path
    learners = list(nodes)
    jobs = [(name, seed) for name in learners for seed in seeds]
    # resume=true: the runs an earlier comparison here finished (checked before the slow extraction)
    previous = compare_resume.previous_comparison(out_dir, bool(cfg.get("resume", False)))
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    if previous is not None:
        compare_resume.check_same_config(previous, OmegaConf.to_container(cfg, resolve=True), out_dir)
        kept = compare_resume.kept_records(previous, jobs, {
            name: OmegaConf.to_container(node, resolve=True) for name, node in nodes.items()}, out_dir)
    feats = extract(cfg, load_source(cfg))
    log.info("features: train %s, test %s, %.1f s", feats.train.shape,
             None if feats.test is None else feats.test.shape, feats.seconds)
    source = feats.source
    data = {"train": source.train.fingerprint(), "test": None if source.test is None else source.test.fingerprint()}
    if kept:
        compare_resume.check_same_inputs(previous, _setup(cfg, feats, learners, seeds, [], data), out_dir)
    make_stream(cfg, source, seeds[0])  # the protocol's and chunk_size's checks, before anything is written
    rd.commit()  # checks passed, features ready: from here on the comparison writes into its directory
    todo = [job for job in jobs if job not in kept]
    results: Iterable[dict[str, Any]]
    if not todo:  # a resume of a finished comparison: rewrite its outputs, start no engine
        results = iter(())
    elif engine == "ray":
        results = run_ray(cfg, feats, nodes, todo, out_dir)
    elif workers > 1 and len(todo) > 1:
        log.info("%d runs in %d worker processes", len(todo), min(workers, len(todo)))
        results = run_parallel(cfg, feats, nodes, todo, out_dir, workers)
    else:
        results = (run_guarded(cfg, feats, name, seed, nodes[name], out_dir, writer_class) for name, seed in todo)
    order = {job: i for i, job in enumerate(jobs)}
    records: list[dict[str, Any]] = [kept[job] for job in jobs if job in kept]  # table order, as run
    bar = tqdm(total=len(jobs), initial=len(records), desc="compare", unit="run",
               disable=not bool(cfg.get("progress", True)))
    try:
        for rec in results:
            if rec["status"] == "ok":
                log.info("%s seed %d: online acc %.4f, mean log-loss %.4f, %.0f ex/s", rec["learner"], rec["seed"],
                         rec["avg_online_accuracy"] or float("nan"), rec["mean_log_loss"] or float("nan"),
                         rec["examples_per_second"] or float("nan"))
            records.append(rec)
            records.sort(key=lambda r: order[(r["learner"], r["seed"])])  # workers finish in any order
            _write(out_dir, _payload(cfg, feats, learners, seeds, records, out_dir, complete=False,
                                     data_fingerprint=data))
            bar.set_postfix_str(f"{rec['learner']} seed {rec['seed']} done")
            bar.update(1)
    finally:
        bar.close()
        if hasattr(results, "close"):  # a Ctrl-C that lands here, not inside the engine, still stops its workers
            results.close()
    payload = _payload(cfg, feats, learners, seeds, records, out_dir, complete=True, data_fingerprint=data)
    _write(out_dir, payload)
    if cfg.get("plots", True):
        from ocl import plots  # matplotlib only when plotting

        plots.plot_online_curves(records, out_dir / "curves.png",
                                 title=f"{feats.source.name}: online accuracy (mean over seeds)")
        plots.plot_accuracy_matrices(records, out_dir / "acc_matrix.png")
    return payload


def _write(out_dir: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(out_dir / "compare.json", payload)
    write_csv(out_dir / "compare.csv", payload["records"])
