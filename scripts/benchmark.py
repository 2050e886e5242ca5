"""The benchmark in one command: every learner on five streams of pretrained features, 3 seeds.

For each stream (an experiment config, ``configs/experiment/bench_*.yaml``) it runs

    ocl compare experiment=<stream> resume=true hydra.run.dir=<out>/<stream> workers=2 seeds=[0,1,2]

then writes ONE combined table (every learner x every stream: online accuracy, near-future
accuracy, mean log-loss, final accuracy, forgetting, ex/s; mean ± std over seeds) as Markdown
and CSV, and one online-accuracy plot per stream, into ``scripts/results/benchmark/``.

Resumable: features are cached (``~/.cache/ocl/features``) and ``resume=true`` keeps every run
that finished, so running the same command again redoes nothing that finished (after a
Ctrl-C, a crash or a reboot it runs only what is missing). Each stream's records are also kept
beside the table (``records/<stream>.json``): on a machine without the run directory, a stream
resumes from them. Streams:

    bench_cifar_split     CIFAR-10, 5-task class-incremental split, all 50,000 images
    bench_cifar_iid       CIFAR-10, iid order
    bench_cifar_permuted  CIFAR-10, labels re-drawn every 1,000 examples
    bench_cifar_bursty    CIFAR-10, class runs (stay 0.9)
    bench_emnist_split    EMNIST-letters sample (1,000 images), 26 letters in 5 tasks

Usage (from the repository root; data under ../shared/data, or set OCL_SHARED_DATA=DIR):

    .venv/bin/python scripts/benchmark.py                       # everything (a long run: see docs/benchmark.md)
    .venv/bin/python scripts/benchmark.py --dry-run             # the commands it would run
    .venv/bin/python scripts/benchmark.py --streams bench_emnist_split --learners linear transformer
    .venv/bin/python scripts/benchmark.py --max-examples 500 --learners linear ncm --seeds 1   # smoke run
    .venv/bin/python scripts/benchmark.py --combine-only        # rebuild the table from the run dirs
                                                                # (or, where one is gone, the records kept
                                                                # beside the table: records/<stream>.json)
    .venv/bin/python scripts/benchmark.py -- threads=1 progress=false   # extra overrides for ocl compare

``--learners`` and ``--seeds`` choose what the table shows and what must have run; a stream's
directory keeps every run it finished (``ocl compare`` refuses to drop one), so asking for
fewer learners or seeds than a directory holds runs nothing new. ``--max-examples N`` cuts every
stream to N examples (``protocol.max_examples``) and, unless ``--out``/``--results`` say
otherwise, works in ``runs/benchmark-max<N>`` and writes its table there, never over the
committed one. Exit code: 0, or the worst ``ocl compare`` exit code (1: some runs failed,
2: a stream was refused, e.g. missing data; 130: interrupted).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from ocl.build import ALL_LEARNERS
from ocl.compare import TABLE_COLUMNS, aggregate, format_cell
from ocl.report import markdown_table, weights_label
from ocl.files import atomic_file, write_atomic

#: The benchmark's streams: experiment config -> title in the table.
STREAMS: dict[str, str] = {
    "bench_cifar_split": "CIFAR-10 split",
    "bench_cifar_iid": "CIFAR-10 iid",
    "bench_cifar_permuted": "CIFAR-10 permuted",
    "bench_cifar_bursty": "CIFAR-10 bursty",
    "bench_emnist_split": "EMNIST letters split",
}
SEEDS = 3
RESULTS = Path(__file__).resolve().parent / "results" / "benchmark"
RANK_BY = "avg_online_accuracy"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides after -- go to every `ocl compare` (e.g. -- threads=1)")
    p.add_argument("--streams", nargs="+", default=list(STREAMS), metavar="EXPERIMENT",
                   help="experiment configs to run (default: the five bench_* streams)")
    p.add_argument("--learners", nargs="+", default=None, metavar="NAME",
                   help="learners to run and show (default: every shipped learner); commas also separate")
    p.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds 0..N-1 per learner (default {SEEDS})")
    p.add_argument("--workers", type=int, default=2, help="runs at once per stream (default 2)")
    p.add_argument("--max-examples", type=int, default=None, metavar="N",
                   help="cut every stream to N examples (a quick smoke run)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder of the per-stream run directories (default runs/benchmark, "
                        "runs/benchmark-max<N> with --max-examples)")
    p.add_argument("--results", type=Path, default=None,
                   help="where the combined table and plots go (default scripts/results/benchmark; "
                        "<out>/results with --max-examples)")
    p.add_argument("--config-dir", type=Path, default=None,
                   help="a folder with experiment/<name>.yaml files of your own streams (added to hydra's search path)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--combine-only", action="store_true", help="rebuild the table from the run directories, run nothing")
    args = p.parse_args(argv)
    args.extra = extra
    if args.learners is not None:
        args.learners = [n for item in args.learners for n in item.split(",") if n]
    if args.seeds < 1 or args.workers < 1 or (args.max_examples is not None and args.max_examples < 1):
        p.error("--seeds, --workers and --max-examples must be >= 1")
    if args.out is None:
        args.out = Path("runs") / ("benchmark" if args.max_examples is None else f"benchmark-max{args.max_examples}")
    if args.results is None:
        args.results = RESULTS if args.max_examples is None else args.out / "results"
    return args


# ---------------------------------------------------------------- running


def finished_runs(run_dir: Path) -> list[tuple[str, int]]:
    """The (learner, seed) runs that finished ok in ``run_dir/compare.json`` (none if absent or unreadable:
    ``ocl compare`` then says what is wrong)."""
    try:
        payload = json.loads((run_dir / "compare.json").read_text())
        return [(r["learner"], r["seed"]) for r in payload["records"] if r.get("status") == "ok"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def canonical(names: set[str]) -> list[str]:
    """Learner names in the table order of ``ocl compare`` (shipped first, then the others by name)."""
    return [n for n in ALL_LEARNERS if n in names] + sorted(names - set(ALL_LEARNERS))


def compare_command(args: argparse.Namespace, experiment: str) -> list[str]:
    """The ``ocl compare`` command for one stream. Learners and seeds are the requested ones plus
    those the directory already finished: a resume may add runs, never drop a finished one."""
    run_dir = args.out / experiment
    done = finished_runs(run_dir)
    learners = set(args.learners or ALL_LEARNERS) | {n for n, _ in done}
    seeds = sorted(set(range(args.seeds)) | {s for _, s in done})
    cmd = [sys.executable, "-m", "ocl.cli", "compare", f"experiment={experiment}", "resume=true",
           f"hydra.run.dir={run_dir}", f"workers={args.workers}", f"seeds=[{','.join(map(str, seeds))}]"]
    if learners != set(ALL_LEARNERS):
        cmd.append(f"learners=[{','.join(canonical(learners))}]")
    if args.max_examples is not None:
        cmd.append(f"protocol.max_examples={args.max_examples}")
    if args.config_dir is not None:
        cmd.append(f"hydra.searchpath=[file://{args.config_dir.resolve()}]")
    return cmd + list(args.extra)


def seed_from_kept_records(args: argparse.Namespace, experiment: str) -> None:
    """A stream without a run directory whose records are kept beside the table (a fresh clone, another
    machine) resumes from them: they become its ``compare.json``, so ``ocl compare resume=true`` keeps
    the runs they hold (after checking the config and the data's fingerprints) and runs the rest."""
    run_dir, kept = args.out / experiment, args.results / "records" / f"{experiment}.json"
    if not (run_dir / "compare.json").exists() and kept.exists() and not args.dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "compare.json", kept.read_bytes())
        print(f"[benchmark] {experiment}: resuming from the records kept in {kept}", file=sys.stderr, flush=True)


def run_streams(args: argparse.Namespace) -> int:
    """Run every stream's comparison; returns the worst exit code (130 stops at once)."""
    worst = 0
    for experiment in args.streams:
        seed_from_kept_records(args, experiment)
        cmd = compare_command(args, experiment)
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        print(f"[benchmark] {experiment}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached ocl compare too: let it keep what finished, then stop
            proc.wait()
            code = 130
        if code == 130:
            print(f"[benchmark] interrupted during {experiment}; run the same command again to continue.",
                  file=sys.stderr)
            return 130
        if code:
            print(f"[benchmark] {experiment}: ocl compare exited with {code}; going on with the other streams.",
                  file=sys.stderr)
        worst = max(worst, code)
    return worst


# ---------------------------------------------------------------- combining


def load_stream(path: Path) -> dict[str, Any] | None:
    """A stream's ``compare.json`` (or its copy kept beside the table); None if absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"[benchmark] cannot read {path}: {e}", file=sys.stderr)
        return None


def combine(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build the combined table from the run directories; write it (Markdown, CSV) and a plot
    per stream into ``args.results``. Returns its rows (one per stream x learner)."""
    from ocl import plots  # matplotlib only when combining

    seeds = set(range(args.seeds))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    setups: dict[str, dict[str, Any]] = {}
    args.results.mkdir(parents=True, exist_ok=True)
    for experiment in args.streams:
        title = STREAMS.get(experiment, experiment)
        run_dir = args.out / experiment
        # Each stream's records are kept beside the table (records/<stream>.json), so that the table can
        # be rebuilt, and streams added to it, on a machine without the run directories.
        kept = args.results / "records" / f"{experiment}.json"
        payload, source = load_stream(run_dir / "compare.json"), f"run directory {run_dir}"
        if payload is not None:
            kept.parent.mkdir(exist_ok=True)
            write_atomic(kept, json.dumps(payload, indent=1).encode())
        else:
            payload, source = load_stream(kept), f"records kept in {kept.relative_to(args.results)}"
        if payload is None:
            notes.append(f"{title} (`{experiment}`): not run yet ({run_dir}/compare.json missing)")
            continue
        records = [r for r in payload["records"] if r["seed"] in seeds
                   and (args.learners is None or r["learner"] in args.learners)]
        names = canonical({r["learner"] for r in records} | set(args.learners or ()))
        setups[experiment] = s = payload["setup"]
        tasks = s["n_tasks"]
        notes.append(f"{title} (`{experiment}`): {s['stream']} / {s['protocol']}, {s['n_examples'] or 0:,} examples, "
                     f"{tasks} task{'' if tasks == 1 else 's'}, {s['num_classes']} classes; {source}"
                     + ("" if payload.get("complete") else " (incomplete: a comparison was interrupted)"))
        for row in aggregate(records, names, RANK_BY):
            rows.append({"stream": experiment, "title": title, "rank": row["rank"], "learner": row["learner"],
                         "seeds_ok": row["ok"], "seeds": len(seeds), "mean": row["mean"], "std": row["std"],
                         "errors": row["errors"]})
        plots.plot_online_curves(records, args.results / f"{experiment}_curves.png",
                                 title=f"{title}: online accuracy (mean over seeds)")
    write_csv(args.results / "benchmark.csv", rows)
    write_atomic(args.results / "benchmark.md", markdown(args, rows, notes, setups).encode())
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One row per stream x learner: mean and std over seeds of each table metric (empty: undefined)."""
    metrics = [m for m, _ in TABLE_COLUMNS]
    with atomic_file(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["stream", "title", "rank", "learner", "seeds_ok", "seeds",
                    *(f"{m}_{k}" for m in metrics for k in ("mean", "std"))])
        for r in rows:
            w.writerow([r["stream"], r["title"], r["rank"], r["learner"], r["seeds_ok"], r["seeds"],
                        *("" if math.isnan(r[k][m]) else r[k][m] for m in metrics for k in ("mean", "std"))])


def markdown(args: argparse.Namespace, rows: Sequence[dict[str, Any]], notes: Sequence[str],
             setups: dict[str, dict[str, Any]]) -> str:
    """The combined table as Markdown: what ran, online accuracy at a glance, then every metric."""
    streams = [e for e in args.streams if any(r["stream"] == e for r in rows)]
    backbones = {(s["backbone"].get("model", "-"), s["backbone"].get("image_size"), weights_label(s["backbone"]),
                  s["feature_dim"]) for s in setups.values()}
    nfs = {None if s.get("near_future") is None else (s["near_future"]["offset"], s["near_future"]["every"])
           for s in setups.values()}
    cmd = shlex.join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    lines = ["# Benchmark: every learner on every stream", "",
             f"Made by `{cmd}` (mean ± std over seeds {sorted(range(args.seeds))}; `--combine-only` "
             "rebuilds it from the run directories).", ""]
    for model, size, weights, dim in sorted(backbones, key=str):
        lines.append(f"Features: {model}" + (f" at {size} px" if size else "") + f" (weights: {weights}), D={dim}.")
    for nf in sorted(nfs, key=str):
        lines.append("Near-future accuracy: off." if nf is None else
                     f"Near-future accuracy: the learner after step t scores the unseen x_(t+1+S), S={nf[0]}, "
                     f"every {nf[1]} steps.")
    if args.max_examples is not None:
        lines.append(f"**Smoke run: every stream cut to {args.max_examples} examples.**")
    lines += ["", "Streams:", "", *(f"- {n}" for n in notes), ""]
    if not rows:
        return "\n".join(lines + ["No results yet.", ""])
    # at a glance: online accuracy, learners x streams, the best of each stream in bold
    learners = canonical({r["learner"] for r in rows})
    by = {(r["stream"], r["learner"]): r for r in rows}
    best = {e: max((r["mean"][RANK_BY] for r in rows if r["stream"] == e and not math.isnan(r["mean"][RANK_BY])),
                   default=math.nan) for e in streams}
    glance = []
    for name in learners:
        cells = []
        for e in streams:
            r = by.get((e, name))
            cell = "" if r is None else format_cell(r["mean"][RANK_BY], r["std"][RANK_BY], RANK_BY)
            cells.append(f"**{cell}**" if r is not None and r["mean"][RANK_BY] == best[e] else cell)
        glance.append([name, *cells])
    lines += ["## Online accuracy", "", markdown_table(glance, ["learner", *(STREAMS.get(e, e) for e in streams)]),
              "", "## Every metric", "",
              "Per stream, ranked by online accuracy (higher is better); log-loss in nats per example.", ""]
    table = []
    for r in rows:
        seeds = f"{r['seeds_ok']}/{r['seeds']}" + ("" if r["seeds_ok"] == r["seeds"] else " (missing or FAILED)")
        table.append([r["title"], r["rank"], r["learner"],
                      *(format_cell(r["mean"][m], r["std"][m], m) for m, _ in TABLE_COLUMNS), seeds])
    lines += [markdown_table(table, ["stream", "#", "learner", *(h for _, h in TABLE_COLUMNS), "seeds ok"],
                             "lrl" + "r" * (len(TABLE_COLUMNS) + 1)), ""]
    errors = [f"- {r['title']} / {r['learner']}: {e}" for r in rows for e in r["errors"]]
    if errors:
        lines += ["Failed runs:", "", *errors, ""]
    lines += ["Plots: `<stream>_curves.png` (online accuracy over the stream, mean over seeds).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    code = 0
    if not args.combine_only:
        code = run_streams(args)
        if args.dry_run or code == 130:
            return code
    rows = combine(args)
    print(f"[benchmark] {len(rows)} rows ({len({r['stream'] for r in rows})} streams) -> "
          f"{args.results / 'benchmark.md'}, {args.results / 'benchmark.csv'}", file=sys.stderr)
    print((args.results / "benchmark.md").read_text())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
