"""The transformer learner against the linear baseline, and what W and R cost (issue 3).

Two parts, both printing tables (and writing JSON + a PNG under ``--out``):

1. ``quality``: on one stream (any ``ocl run`` stream overrides) and for each protocol in
   ``--protocols``, runs the online softmax regression and transformer variants — both
   label modes, R = 1 vs R > 1, W = 0 vs W > 0 — prequentially on the same cached features
   and reports average online accuracy, mean log-loss and examples/s. It also aligns
   the online accuracy on every task / label-mapping switch and plots the mean over
   switches (``switches_<protocol>.png``): how fast each learner recovers.
2. ``cost``: examples/s of the transformer update+predict loop for W in ``--windows`` and R
   in ``--streams`` on synthetic features (D = 384, the DINO ViT-S width), 1 thread.
3. ``chunks``: what the chunk size costs: the transformer (defaults) at every C in
   ``--chunks`` on each protocol of ``--protocols``, online accuracy, mean log-loss and
   examples/s (a prediction never sees a label of its own chunk, so larger chunks trade
   accuracy for speed), with online softmax regression (C = 1) as the reference row.

Examples::

    .venv/bin/python scripts/bench_transformer.py quality --out runs/bench_cifar --per-task 2000 \\
        --max-examples 10000 stream=cifar10 stream.root=../data/cifar10 backbone=pixels
    .venv/bin/python scripts/bench_transformer.py quality --out runs/bench_emnist --segment 100 \\
        stream=emnist stream.format=csv \\
        stream.train_file=../shared/data/emnist-letters-sample/light-train.csv \\
        stream.test_file=../shared/data/emnist-letters-sample/light-test.csv
    .venv/bin/python scripts/bench_transformer.py cost --out runs/bench_cost
    .venv/bin/python scripts/bench_transformer.py chunks --out runs/bench_chunks --per-task 2000 \
        --max-examples 10000 stream=arrays stream.path=/work/research_feats/cifar_128.npz backbone=pixels
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module

from ocl.build import learning_threads, make_learner, prepare, seed_everything
from ocl.learners.transformer import TransformerLearner
from ocl.report import format_table
from ocl.runner import run_stream

# name -> learner overrides. Defaults of configs/learner/transformer.yaml: kv, R=8, W=64.
VARIANTS: dict[str, list[str]] = {
    "linear": ["learner=linear"],
    "tf kv R8 W64": ["learner=transformer"],
    "tf kv R1 W64": ["learner=transformer", "learner.replay_streams=1"],
    "tf kv R8 W0": ["learner=transformer", "learner.window=0"],
    "tf ctx R8 W64": ["learner=transformer", "learner.label_mode=context"],
}


def switch_profile(correct: np.ndarray, switches: np.ndarray, before: int, after: int) -> np.ndarray:
    """Mean correctness at offsets ``-before .. after-1`` around each switch, ``(before+after,)``.

    Switches too close to either end of the stream are left out (the profile is over whole windows).
    """
    rows = [correct[s - before : s + after] for s in switches if s - before >= 0 and s + after <= len(correct)]
    if not rows:
        return np.full(before + after, np.nan)
    return np.mean(np.asarray(rows, dtype=np.float64), axis=0)


def protocol_overrides(protocol: str, args: argparse.Namespace) -> list[str]:
    """``ocl run`` overrides for one of ``--protocols``."""
    proto = [f"protocol={protocol}", f"protocol.max_examples={args.max_examples}"]
    if protocol == "split":
        proto += [f"protocol.n_tasks={args.n_tasks}", f"protocol.examples_per_task={args.per_task}"]
    if protocol == "permuted":
        proto.append(f"protocol.segment_length={args.segment}")
    return proto


def run_variant(args: argparse.Namespace, overrides: list[str], chunk: int):
    """One prequential run: ``(source, stream, RunResult)``; features come from the cache after the first."""
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose("config", overrides=["progress=false", f"seed={args.seed}", "eval_test=false", *overrides,
                                           *args.overrides])
    seed_everything(args.seed)
    run = prepare(cfg)
    source, stream, feats = run.source, run.stream, run.train
    learner = make_learner(cfg.learner, feats.shape[1], stream.num_classes, int(cfg.seed))
    with learning_threads(args.threads):
        res = run_stream(learner, feats, stream, chunk_size=chunk, progress=True)
    return source, stream, feats, res


def quality(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, profiles = [], {}
    names = args.variants or list(VARIANTS)
    for protocol in args.protocols:
        for name in names:
            source, stream, feats, res = run_variant(args, protocol_overrides(protocol, args) + VARIANTS[name],
                                                     args.chunk)
            tr = res.tracker
            s = tr.summary()
            switches = stream.boundaries()
            prof = switch_profile(tr.correct, switches, args.before, args.after)
            profiles[(protocol, name)] = prof
            b = args.before
            rec = {
                "stream": source.name, "protocol": protocol, "learner": name, "n": len(stream),
                "D": int(feats.shape[1]), "K": stream.num_classes, "switches": int(switches.size),
                "avg_online_accuracy": s["avg_online_accuracy"], "mean_log_loss": s["mean_log_loss"],
                "cumulative_log_loss": s["cumulative_log_loss"],
                "acc_first_50_after_switch": float(np.nanmean(prof[b : b + 50])),
                f"acc_50_to_{args.after}_after_switch": float(np.nanmean(prof[b + 50 :])),
                "examples_per_second": len(stream) / res.learn_seconds,
            }
            records.append(rec)
            logging.info("%s", rec)
            (out / "quality.json").write_text(json.dumps(records, indent=1))  # partial results survive
    print(format_table(
        [(r["protocol"], r["learner"], r["n"], r["avg_online_accuracy"], r["mean_log_loss"],
          r["acc_first_50_after_switch"], r[f"acc_50_to_{args.after}_after_switch"], r["examples_per_second"])
         for r in records],
        headers=("protocol", "learner", "examples", "online acc", "log-loss/ex", "acc 0-50 after switch",
                 f"acc 50-{args.after} after", "ex/s")))
    plot_profiles(profiles, args.before, args.smooth, out, records[0]["stream"] if records else "")


def plot_profiles(profiles: dict, before: int, smooth: int, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for protocol in sorted({p for p, _ in profiles}):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for (p, name), prof in profiles.items():
            if p != protocol or np.isnan(prof).all():
                continue
            k = np.ones(smooth) / smooth  # centred moving average: a per-offset mean over few switches is noisy
            y = np.convolve(prof, k, mode="same") / np.convolve(np.ones_like(prof), k, mode="same")  # fair edges
            ax.plot(np.arange(len(prof)) - before, y, label=name)
        ax.axvline(0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("examples since the switch (task or label mapping)")
        ax.set_ylabel(f"online accuracy (mean over switches, smoothed {smooth})")
        ax.set_title(f"{title} / {protocol}: accuracy around switches")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"switches_{protocol}.png", dpi=120)
        plt.close(fig)


def chunks(args: argparse.Namespace) -> None:
    """Online accuracy, log-loss and examples/s of the transformer at each chunk size."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for protocol in args.protocols:
        runs = [("linear", 1)] + [("transformer", C) for C in args.chunks]
        for learner, C in runs:
            source, stream, feats, res = run_variant(args, protocol_overrides(protocol, args) + [f"learner={learner}"],
                                                     C)
            s = res.tracker.summary()
            records.append({"stream": source.name, "protocol": protocol, "learner": learner, "chunk_size": C,
                            "n": len(stream), "D": int(feats.shape[1]), "avg_online_accuracy": s["avg_online_accuracy"],
                            "mean_log_loss": s["mean_log_loss"], "examples_per_second": len(stream) / res.learn_seconds})
            logging.info("%s", records[-1])
            (out / "chunks.json").write_text(json.dumps(records, indent=1))  # partial results survive
    print(format_table([(r["protocol"], r["learner"], r["chunk_size"], r["n"], r["avg_online_accuracy"],
                         r["mean_log_loss"], f"{r['examples_per_second']:.0f}") for r in records],
                       headers=("protocol", "learner", "C", "examples", "online acc", "log-loss/ex", "ex/s")))


def cost(args: argparse.Namespace) -> None:
    """Examples/s of predict + update on synthetic features, for each (W, R)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    D, K, n = 384, 10, args.cost_examples
    x, y = torch.randn(n, D, generator=g), torch.randint(0, K, (n,), generator=g)
    rows, records = [], []
    with learning_threads(args.threads):
        for mode in ("kv", "context"):
            for W in args.windows:
                for R in args.streams:
                    learner = TransformerLearner(D, K, seed=0, label_mode=mode, window=W, replay_streams=R)
                    warm = 2 * W + 20  # fill the window first: cost is measured in the steady state
                    xs, ys = torch.randn(warm, D, generator=g), torch.randint(0, K, (warm,), generator=g)
                    for i in range(warm):
                        learner.predict(xs[i : i + 1])
                        learner.update(xs[i : i + 1], ys[i : i + 1])
                    t0 = time.perf_counter()
                    for i in range(n):
                        learner.predict(x[i : i + 1])
                        learner.update(x[i : i + 1], y[i : i + 1])
                    eps = n / (time.perf_counter() - t0)
                    records.append({"label_mode": mode, "W": W, "R": R, "examples_per_second": eps,
                                    "ms_per_example": 1000 / eps})
                    rows.append((mode, W, R, eps, 1000 / eps))
                    logging.info("%s", records[-1])
    (out / "cost.json").write_text(json.dumps(records, indent=1))
    print(format_table(rows, headers=("label mode", "W", "R", "ex/s", "ms/example")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["quality", "cost", "chunks"])
    ap.add_argument("overrides", nargs="*", help="ocl run overrides for the stream and backbone")
    ap.add_argument("--out", default="runs/bench_transformer")
    ap.add_argument("--protocols", nargs="+", default=["split", "permuted"])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    ap.add_argument("--max-examples", type=int, default=None)
    ap.add_argument("--n-tasks", type=int, default=5)
    ap.add_argument("--per-task", default="null", help="split: examples kept per task (null: all)")
    ap.add_argument("--segment", type=int, default=1000, help="permuted: examples per label mapping")
    ap.add_argument("--chunk", type=int, default=1, help="quality: the chunk size C")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="chunks: the chunk sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", type=int, default=50, help="switch plot: examples before each switch")
    ap.add_argument("--after", type=int, default=400, help="switch plot: examples after each switch")
    ap.add_argument("--smooth", type=int, default=9)
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 16, 64, 256])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--cost-examples", type=int, default=150)
    args = ap.parse_intermixed_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.max_examples is None:
        args.max_examples = "null"
    {"quality": quality, "cost": cost, "chunks": chunks}[args.part](args)


if __name__ == "__main__":
    main()
