"""Ablations of the transformer learner: which parts of the method carry its results.

Runs ``ocl run learner=pooled`` (the default: the network pooled with a linear read-out and SLDA)
and ``learner=transformer`` (the network alone) with their defaults and with one part of the
network taken away at a time, on benchmark streams, for several seeds, and prints one table (mean ± std over seeds):

    .venv/bin/python scripts/ablations.py --config-dir scripts/results/benchmark10k/presets \
        --streams bench10k_cifar_split bench10k_cifar_permuted --out runs/ablations \
        --results scripts/results/ablations -- threads=1

Variants (``--variants``; each is a set of ``learner.*`` overrides of the defaults):

- ``default``: the shipped defaults (``learner=pooled``); the next four change its network;
- ``W=0``: no KV cache (``window=0``): every chunk sees only itself, no in-context memory;
- ``R=1``: no replay streams (``replay_streams=1``): train on the newest chunk only;
- ``R=4``: half the replay streams (not an ablation: a candidate default that
  ``scripts/results/transformer_quality.md`` tested; not in the default ``--variants``);
- ``context``: labels as their own tokens (``label_mode=context``, 2 tokens per example)
  instead of an extra key/value projection;
- ``network``: the network alone, without the read-out experts it is pooled with
  (``learner=transformer``);
- ``network W=0``, ``network R=1``, ``network context``: the three ablations above of the network
  alone (the mixture's linear read-out can make up for what they take away);
- ``readout_pool``, ``linear``, ``mlp``: the baselines each row is read against (the pool without
  the network, and two learners of the same features).

Any other variant is ``network`` or ``default`` followed by the network's options, e.g.
``"network segment=8 lr=0.003"`` (the research sweeps of ``docs/research/``).

``--paired BASE`` adds, per stream, each other variant minus ``BASE`` paired by seed (the same
seed is the same stream order): what the one difference between the two adds, with its spread
over seeds (ex/s as a ratio).

Runs that finished (a ``results.json`` in their directory) are not redone, so the script can be
stopped and restarted. Held-out test evaluation is off (``eval_test=false``): the table is about
the online, prequential metrics. "first 100" is online accuracy over the first 100 examples after
each task switch or label re-draw (the stream's first task left out), as in ``scripts/recovery.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ocl.metrics import accuracy_after_switches
from ocl.report import read_steps_csv


def _pooled(*network: str) -> tuple[str, list[str]]:
    """The default pool whose network takes ``network`` options (``key:value``)."""
    expert = f"{{name:transformer,{','.join(network)}}}" if network else "transformer"
    return "pooled", [f"learner.experts=[{expert},linear,slda]"] if network else []


#: variant -> (the learner config, its overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": _pooled(),
    "W=0": _pooled("window:0"),
    "R=1": _pooled("replay_streams:1"),
    "R=4": _pooled("replay_streams:4"),  # not an ablation: a candidate default the research log tested
    "context": _pooled("label_mode:context"),
    "network": ("transformer", []),
    # The same three ablations of the network alone: in the pool the read-outs can hide them.
    "network W=0": ("transformer", ["learner.window=0"]),
    "network R=1": ("transformer", ["learner.replay_streams=1"]),
    "network context": ("transformer", ["learner.label_mode=context"]),
    "readout_pool": ("readout_pool", []),
    "linear": ("linear", []),
    "mlp": ("mlp", []),
}


def learner_of(name: str) -> tuple[str, list[str]]:
    """The learner config and overrides of a variant: one of :data:`VARIANTS`, or ``network`` /
    ``default`` and ``key=value`` options of the network (``"network segment=8 lr=0.003"``)."""
    if name in VARIANTS:
        return VARIANTS[name]
    base, *options = name.split()
    if base not in ("network", "default") or not options or not all("=" in o for o in options):
        raise SystemExit(f"error: variant {name!r} is none of {', '.join(VARIANTS)}, nor 'network'/'default' "
                         "followed by key=value options of the network")
    if base == "network":
        return "transformer", [f"learner.{o}" for o in options]
    return _pooled(*(o.replace("=", ":", 1) for o in options))
METRICS = ("avg_online_accuracy", "near_future_accuracy", "mean_log_loss", "first100", "examples_per_second")
HEADERS = ("online acc", "near-future acc", "log-loss", "first 100 after a switch", "ex/s")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="overrides after -- go to every `ocl run` (e.g. -- threads=1)")
    p.add_argument("--streams", nargs="+", default=["bench10k_cifar_split", "bench10k_cifar_permuted"],
                   metavar="EXPERIMENT", help="experiment configs to run (default: the 10k split and permuted presets)")
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in ("R=4", "readout_pool", "linear",
                                                                                       "mlp")],
                   metavar="VARIANT", help=f"which variants (of {', '.join(VARIANTS)}, or 'network k=v ...'; default: "
                                           "all but R=4 and the baselines)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per run (default 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run from this one (default 0: the benchmark's; research sweeps use others, e.g. 100)")
    p.add_argument("--workers", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--config-dir", type=Path, default=None,
                   help="a folder with experiment/<name>.yaml files (added to hydra's search path)")
    p.add_argument("--out", type=Path, default=Path("runs/ablations"), help="run directories (default runs/ablations)")
    p.add_argument("--results", type=Path, default=None, help="write <name>.md and <name>.json here")
    p.add_argument("--name", default="ablations", help="the stem of those two files (default: ablations)")
    p.add_argument("--combine-only", action="store_true", help="build the table from finished runs, run nothing")
    p.add_argument("--paired", default=None, metavar="VARIANT",
                   help="add each other variant minus this one, paired by seed (what the difference between them adds)")
    return p.parse_args(argv), extra


def seeds(args: argparse.Namespace) -> range:
    return range(args.first_seed, args.first_seed + args.seeds)


def run_dir(args: argparse.Namespace, stream: str, variant: str, seed: int) -> Path:
    safe = variant.replace("=", "").replace(" ", "_").replace(":", "")
    return args.out / stream / f"{safe}_s{seed}"


def command(args: argparse.Namespace, stream: str, variant: str, seed: int, extra: list[str]) -> list[str]:
    learner, overrides = learner_of(variant)
    cmd = [sys.executable, "-m", "ocl.cli", "run", f"experiment={stream}", f"learner={learner}", f"seed={seed}",
           "eval_test=false", "progress=false", f"hydra.run.dir={run_dir(args, stream, variant, seed)}",
           *overrides, *extra]
    if args.config_dir is not None:
        cmd.append(f"hydra.searchpath=[file://{args.config_dir.resolve()}]")
    return cmd


def first_after_switch(directory: Path, first: int = 100) -> float:
    """Online accuracy over the first ``first`` examples after each switch (nan without switches)."""
    task, correct = read_steps_csv(directory / "steps.csv")
    m = accuracy_after_switches(task, correct, len(task))
    return float(np.nanmean(m[:, :first])) if m.size else float("nan")


def per_seed(args: argparse.Namespace, stream: str, variant: str) -> dict[int, dict[str, float]]:
    """The finished runs of one variant on one stream: seed -> metric -> value."""
    out = {}
    for seed in seeds(args):
        d = run_dir(args, stream, variant, seed)
        if not (d / "results.json").is_file():
            continue
        res = json.loads((d / "results.json").read_text())
        res["first100"] = first_after_switch(d)
        out[seed] = {m: float(res[m]) if res.get(m) is not None else float("nan") for m in METRICS}
    return out


def mean_std(values: Sequence[float]) -> list[float] | None:
    n = len(values)
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if n > 1 else 0.0] if n else None


def combine(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per stream and variant: mean and sample std over seeds of every metric; with
    ``--paired BASE``, also one row per other variant of ``variant - BASE`` paired by seed (same
    seed, same stream order; ex/s as the ratio ``variant / BASE``), over the seeds both finished."""
    rows = []
    for stream in args.streams:
        runs = {v: per_seed(args, stream, v) for v in args.variants}
        for variant in args.variants:
            got = runs[variant]
            rows.append({"stream": stream, "variant": variant, "seeds": len(got),
                         **{m: mean_std([r[m] for r in got.values()]) for m in METRICS}})
        if args.paired is None:
            continue
        base = runs[args.paired]
        for variant in args.variants:
            both = sorted(set(runs[variant]) & set(base))
            if variant == args.paired or not both:
                continue
            a, b = runs[variant], base
            rows.append({"stream": stream, "variant": f"{variant} - {args.paired}", "seeds": len(both), "paired": True,
                         **{m: mean_std([a[s][m] / b[s][m] if m == "examples_per_second" else a[s][m] - b[s][m]
                                         for s in both]) for m in METRICS}})
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| stream | variant | seeds | " + " | ".join(HEADERS) + " |", "|" + " --- |" * (3 + len(HEADERS))]
    for r in rows:
        cells = []
        for m in METRICS:
            v = r[m]
            if v is None or np.isnan(v[0]):
                cells.append("-")
            elif m == "examples_per_second":
                cells.append(f"{v[0]:.2f}x ± {v[1]:.2f}" if r.get("paired") else f"{v[0]:.0f} ± {v[1]:.0f}")
            else:
                cells.append(f"{v[0]:+.4f} ± {v[1]:.4f}" if r.get("paired") else f"{v[0]:.4f} ± {v[1]:.4f}")
        lines.append(f"| {r['stream']} | {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    args, extra = parse_args(argv)
    for name in args.variants:
        learner_of(name)  # a bad variant fails before anything runs
    if args.paired is not None and args.paired not in args.variants:
        raise SystemExit(f"error: --paired {args.paired!r} is not one of --variants {args.variants}")
    if not args.combine_only:
        jobs = [(s, v, seed) for s in args.streams for v in args.variants for seed in seeds(args)
                if not (run_dir(args, s, v, seed) / "results.json").is_file()]
        print(f"{len(jobs)} runs to do", file=sys.stderr)

        def one(job: tuple[str, str, int]) -> int:
            cmd = command(args, *job, extra)
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            print(f"{'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}: {' '.join(cmd[3:])}",
                  file=sys.stderr)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode

        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            failed = sum(rc != 0 for rc in pool.map(one, jobs))
        if failed:
            print(f"error: {failed} run(s) failed; their logs are in their run directories", file=sys.stderr)
    rows = combine(args)
    table = markdown(rows)
    print(table)
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{args.name}.md").write_text(table)
        (args.results / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
