"""The ``ocl`` command line.

``ocl run [key=value ...]`` runs one prequential experiment configured with hydra
(config groups ``stream=``, ``protocol=``, ``backbone=``, ``learner=``; see configs/).
``ocl compare [key=value ...] learners=[a,b,...] seeds=N`` runs several learners x seeds
on one stream with the same overrides (configs/compare.yaml) and prints a ranked table.
``ocl extract [key=value ...]`` fills the feature cache of a stream (configs/extract.yaml),
in this process or, with ``engine=ray``, over a Ray cluster.
Errors a user can fix are printed as one message, with a non-zero exit code.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ocl.errors import OCLError
from ocl.report import check_writable_dir, format_table

log = logging.getLogger("ocl")

USAGE = """\
usage: ocl <command> [key=value ...]

commands:
  run       one learner on one stream, scored prequentially (predict, score, then learn)
  compare   several learners x seeds on one stream (features extracted once): ranked table,
            compare.json/.csv, curves.png, acc_matrix.png
  extract   fill the feature cache of a stream (train and test split) without running a learner

examples:
  ocl run                                            # digits, 5-task split, pixels, linear
  ocl run stream=cifar10 stream.root=DIR protocol=split protocol.n_tasks=5
  ocl run stream=emnist stream.format=csv stream.train_file=F stream.test_file=G
  ocl run backbone=dino_vits16 backbone.weights=/path/to/dino_deitsmall16_pretrain.pth
  ocl run --help                                     # every config group and option
  ocl compare learners=[linear,knn,er] seeds=3       # the same overrides as ocl run, plus these
  ocl compare seeds=2                                # every baseline, Avalanche strategy and the transformer
  ocl compare learners=[linear,knn] seeds=3 engine=ray   # the runs as Ray tasks (pip install -e ".[ray]")
  ocl extract stream=cifar10 stream.root=DIR backbone=dino_vits16 cache_dtype=float16
  ocl extract <the same overrides> engine=ray ray.address=HOST:6379   # sharded over a Ray cluster
"""


def results_table(res: dict[str, Any], out_dir: str) -> str:
    """The summary a person reads after a run."""
    bb = res.get("backbone", {})
    weights = bb.get("weights", "-")
    rows: list[tuple[str, Any]] = [
        ("stream", f"{res['stream']} / {res['protocol']} ({res['n_tasks']} tasks, {res['num_classes']} classes)"),
        ("backbone", f"{bb.get('model', '-')} (weights: {weights}), D={res['feature_dim']}"),
        ("learner", f"{res['learner']} (chunk {res['chunk_size']}, seed {res['seed']})"),
        ("examples", res["n_examples"]),
        ("avg online accuracy", res["avg_online_accuracy"]),
        (near_future_label(res), res["near_future_accuracy"] if res.get("near_future_every") else "off"),
        ("cumulative log-loss (nats)", res["cumulative_log_loss"]),
        ("mean log-loss (nats/example)", res["mean_log_loss"]),
    ]
    if "final_avg_accuracy" in res:
        rows += [
            ("final avg test accuracy", res["final_avg_accuracy"]),
            ("forgetting", res["forgetting"]),
            ("backward transfer", res["backward_transfer"]),
        ]
    rows += [
        ("examples / second (learner)", res["examples_per_second"]),
        ("feature time (s)", res["feature_seconds"]),
        ("results", out_dir),
    ]
    table = format_table(rows, headers=("metric", "value"), align="ll")
    if res.get("random_backbone"):
        table += "\nWARNING: the backbone has RANDOM weights (backbone.weights=random); these are not DINO features."
    return table


def near_future_label(res: dict[str, Any]) -> str:
    """``near-future accuracy (S=100, every 20: 66 evals)``: the metric with its settings."""
    if not res.get("near_future_every"):
        return "near-future accuracy"
    return (f"near-future accuracy (S={res['near_future_offset']}, every {res['near_future_every']}: "
            f"{res['near_future_evaluations']} evals)")


def _fail(e: OCLError) -> None:
    log.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="pkg://ocl.configs", config_name="config")
def _run(cfg: DictConfig) -> None:
    from ocl.checkpoint import RunInterrupted
    from ocl.experiment import run_experiment  # heavy imports after hydra parsed the args

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        res = run_experiment(cfg, out_dir)
    except RunInterrupted as e:  # Ctrl-C/SIGTERM: checkpoint written; a clean stop, not an error
        log.warning("%s", e)
        print(str(e), file=sys.stderr)
        sys.exit(130)
    except OCLError as e:
        _fail(e)
    print(results_table(res, out_dir))


@hydra.main(version_base=None, config_path="pkg://ocl.configs", config_name="compare")
def _compare(cfg: DictConfig) -> None:
    from ocl.compare import ranked_table, run_compare  # heavy imports after hydra parsed the args

    hc = HydraConfig.get()
    ignored = [o for o in hc.overrides.task if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "learner"]
    if ignored:
        msg = (f"ocl compare ignores {ignored}: name learners with learners=[a,b,...] and set their options "
               "with +learner_options.NAME.KEY=VALUE")
        log.warning("%s", msg)
        print(f"warning: {msg}", file=sys.stderr)
    out_dir = hc.runtime.output_dir
    try:
        payload = run_compare(cfg, out_dir)
    except OCLError as e:
        _fail(e)
    except KeyboardInterrupt:  # Ctrl-C: the records written so far stay; no traceback for a deliberate stop
        msg = (f"interrupted: the runs that had finished are kept in {out_dir}/compare.json and compare.csv; "
               "the others did not run to the end")
        log.warning("%s", msg)
        print(msg, file=sys.stderr)
        sys.exit(130)
    print(ranked_table(payload))
    failed = [r for r in payload["records"] if r["status"] != "ok"]
    if failed:
        print(f"error: {len(failed)} of {len(payload['records'])} runs failed (see the errors above and "
              f"{out_dir}/compare.json); the others' results are complete.", file=sys.stderr)
        sys.exit(1)


def extract_table(rows: list[dict[str, Any]]) -> str:
    """What ``ocl extract`` prints: one row per split, and where its cache entry is."""
    table = format_table(
        [(r["split"], r["images"], r["feature_dim"], r["dtype"], f"{r['bytes'] / 2**20:,.1f} MiB",
          "cached" if r["cached"] else f"{r['seconds']:.1f}", "-" if r["cached"] else f"{r['images_per_second']:,.0f}")
         for r in rows],
        headers=("split", "images", "D", "dtype", "size", "seconds", "img/s"), align="lrrlrrr")
    return "\n".join([table, *(f"{r['split']} cache: {r['path']}" for r in rows)])


@hydra.main(version_base=None, config_path="pkg://ocl.configs", config_name="extract")
def _extract(cfg: DictConfig) -> None:
    from ocl.extract import run_extract  # heavy imports after hydra parsed the args

    try:
        rows = run_extract(cfg)
    except OCLError as e:
        _fail(e)
    except KeyboardInterrupt:  # the shards written so far stay (engine=ray); no traceback for a deliberate stop
        msg = "interrupted: run the same command again to continue (engine=ray keeps the shards it has written)"
        log.warning("%s", msg)
        print(msg, file=sys.stderr)
        sys.exit(130)
    print(extract_table(rows))


COMMANDS: dict[str, Callable[[], Any]] = {"run": _run, "compare": _compare, "extract": _extract}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ocl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    # hydra creates the run directory before any of our code runs: refuse a bad one first.
    run_dir = next((a.split("=", 1)[1] for a in rest if a.startswith("hydra.run.dir=")), None)
    if run_dir and "${" not in run_dir:
        try:
            check_writable_dir(run_dir)
        except OCLError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    # `stream._target_=my_module.fn` should find my_module.py in the working directory, as
    # `python -m` would; appended, so a local file never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    # hydra.main parses sys.argv itself; hand it only the overrides.
    sys.argv = [f"ocl {cmd}", *rest]
    COMMANDS[cmd]()


if __name__ == "__main__":
    main()
