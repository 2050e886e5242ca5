"""Combine the `benchmark.csv` files of several benchmark result folders into one Markdown table.

Rows of learners run at different times (new learners, or a learner whose defaults changed) can
be set side by side without re-running the others. ``--drop FOLDER:LEARNER`` leaves out a row a
later folder replaces; ``--same A=B`` puts stream A's rows in stream B's column where both names
are one preset (the EMNIST stream is the same 1,000 examples in the 10k and the full-size
benchmark). Example (the 10k benchmark with today's learners):

    .venv/bin/python scripts/combine_tables.py scripts/results/benchmark10k scripts/results/benchmark10k_ranpac \
        scripts/results/benchmark10k_pooled scripts/results/benchmark10k_copy scripts/results/benchmark10k_recency \
        scripts/results/benchmark10k_stream0 --drop benchmark10k:transformer benchmark10k_pooled:transformer \
        benchmark10k_pooled:pooled benchmark10k_copy:transformer benchmark10k_copy:pooled \
        benchmark10k_recency:transformer benchmark10k_recency:pooled > scripts/results/benchmark10k/all_learners.md

and the full-size one, whose EMNIST rows of today's `transformer`, `pooled` and `readout_pool` are the
10k ones:

    .venv/bin/python scripts/combine_tables.py scripts/results/benchmark scripts/results/benchmark_ranpac \
        scripts/results/benchmark_stream0 scripts/results/benchmark10k_pooled scripts/results/benchmark10k_stream0 \
        --drop benchmark:transformer benchmark10k_pooled:pooled benchmark10k_pooled:transformer \
        --same bench10k_emnist_split=bench_emnist_split \
        --streams bench_cifar_split bench_cifar_iid bench_cifar_permuted bench_cifar_bursty bench_emnist_split \
        > scripts/results/benchmark/all_learners.md
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

METRICS = [("avg_online_accuracy", "Online accuracy", True), ("near_future_accuracy", "Near-future accuracy", True),
           ("mean_log_loss", "Mean log-loss (nats)", False), ("final_avg_accuracy", "Final test accuracy", True),
           ("forgetting", "Forgetting", False), ("examples_per_second", "Examples per second (indicative)", True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="result folders holding benchmark.csv")
    p.add_argument("--drop", nargs="*", default=[], help="FOLDER_NAME:LEARNER rows to leave out")
    p.add_argument("--same", nargs="*", default=[], metavar="A=B",
                   help="stream A is stream B under another name (the same preset): its rows go in B's column")
    p.add_argument("--streams", nargs="*", default=None, help="only these streams' columns (after --same)")
    args = p.parse_args()
    drop = {tuple(d.split(":", 1)) for d in args.drop}
    same = dict(a.split("=", 1) for a in args.same)
    rows, streams, learners, origin = {}, [], [], {}
    for folder in args.folders:
        with open(folder / "benchmark.csv", newline="") as f:
            for r in csv.DictReader(f):
                r["stream"] = same.get(r["stream"], r["stream"])
                if (folder.name, r["learner"]) in drop or (args.streams is not None and r["stream"] not in args.streams):
                    continue
                if r["stream"] not in streams:
                    streams.append(r["stream"])
                if r["learner"] not in learners:
                    learners.append(r["learner"])
                rows[r["learner"], r["stream"]] = r
                if folder.name not in origin.setdefault(r["learner"], []):
                    origin[r["learner"]].append(folder.name)
    out = ["# The benchmark, every learner", "",
           "Combined from " + ", ".join(f"`{f}`" for f in args.folders) + " by `scripts/combine_tables.py`"
           + (f" (left out: {', '.join(sorted(args.drop))})" if args.drop else "")
           + (f" (the same preset under two names: {', '.join(args.same)})" if args.same else "") + "; mean ± std over seeds; "
           "**bold**: best per stream. Where each row was made: "
           + ", ".join(f"{lr} ({' + '.join(origin[lr])})" for lr in learners) + ".", ""]
    for key, title, higher in METRICS:
        out += [f"## {title}", "", "| learner | " + " | ".join(streams) + " |",
                "| :--- | " + " | ".join("---:" for _ in streams) + " |"]
        best = {}
        for s in streams:
            vals = [float(rows[lr, s][f"{key}_mean"]) for lr in learners
                    if (lr, s) in rows and rows[lr, s][f"{key}_mean"] not in ("", "nan")]
            best[s] = (max if higher else min)(vals) if vals else None
        for lr in learners:
            cells = []
            for s in streams:
                r = rows.get((lr, s))
                m = r and r[f"{key}_mean"]
                if not m or m == "nan":
                    cells.append("-")
                    continue
                fmt = "{:,.0f}" if key == "examples_per_second" else "{:.4f}"
                cell = f"{fmt.format(float(m))} ± {fmt.format(float(r[f'{key}_std'] or 0))}"
                cells.append(f"**{cell}**" if float(m) == best[s] and key != "examples_per_second" else cell)
            out.append(f"| {lr} | " + " | ".join(cells) + " |")
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
