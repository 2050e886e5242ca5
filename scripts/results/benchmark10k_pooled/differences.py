"""Paired differences between two learners of the 10k benchmark, per stream and metric: the
difference of each seed's run (same seed = same stream order), then mean ± sample std over seeds.

    python scripts/results/benchmark10k_pooled/differences.py runs/benchmark10k_pooled pooled readout_pool \
        [--ref runs/benchmark10k_linear]     # the second learner's runs from another folder
        [--streams bench_cifar_split ...]    # other streams (default: the 10k benchmark's five)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = ("avg_online_accuracy", "near_future_accuracy", "final_avg_accuracy")
STREAMS = ("bench10k_cifar_split", "bench10k_cifar_iid", "bench10k_cifar_permuted", "bench10k_cifar_bursty",
           "bench10k_emnist_split")


def runs(folder: Path, stream: str, learner: str) -> dict[int, dict]:
    path = folder / stream / "compare.json"
    if not path.exists():
        return {}
    recs = json.loads(path.read_text())["records"]
    return {r["seed"]: r for r in recs if r["learner"] == learner and r.get("status") == "ok"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", type=Path)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--ref", type=Path, default=None, help="folder of b's runs (default: the same)")
    p.add_argument("--streams", nargs="+", default=list(STREAMS), help="streams (default: the 10k benchmark's)")
    args = p.parse_args()
    print(f"| stream | {' | '.join(f'{m}: {args.a} - {args.b}' for m in METRICS)} | seeds |")
    print("| :--- |" + " ---: |" * (len(METRICS) + 1))
    for stream in args.streams:
        a, b = runs(args.runs, stream, args.a), runs(args.ref or args.runs, stream, args.b)
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        cells = []
        for m in METRICS:
            d = [a[s][m] - b[s][m] for s in seeds if a[s].get(m) is not None and b[s].get(m) is not None]
            sd = statistics.stdev(d) if len(d) > 1 else float("nan")
            cells.append(f"{statistics.mean(d):+.4f} ± {sd:.4f}" if d else "-")
        print(f"| {stream} | {' | '.join(cells)} | {len(seeds)} |")


if __name__ == "__main__":
    main()
