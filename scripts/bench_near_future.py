"""What near-future evaluation costs: its share of a run's wall time, per learner.

Every learner runs once with near-future evaluation on; the runner times the near-future
evaluations separately (``near_future_seconds``), so the share is measured inside one run,
not as the difference of two runs on a shared, noisy machine. One evaluation costs about one
``predict`` of one example plus scoring it; where a learner computes something lazily that
its next ``predict`` would compute anyway (SLDA's precision refresh), the evaluation takes
that cost from the predict and the share overstates the true overhead.

By default the stream is synthetic and large-featured, the expensive case for learners whose
prediction scales with D (kNN, SLDA): 6,000 iid examples of 10 Gaussian classes, D = 1280
(EfficientNet-Lite0's feature size). Or any `ocl run` overrides after ``--config``:

    .venv/bin/python scripts/bench_near_future.py                                # synthetic, S=100, m=20
    .venv/bin/python scripts/bench_near_future.py near_future.every=10
    .venv/bin/python scripts/bench_near_future.py --config protocol=bursty       # digits, pixels
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
from hydra import compose, initialize_config_module

from ocl.build import (ALL_LEARNERS, Features, extract, learner_config, learning_threads, load_source, make_learner,
                       make_stream, seed_everything)
from ocl.options import make_near_future
from ocl.report import format_table
from ocl.runner import run_stream
from ocl.streams.base import ArrayImageSet, Source


def synthetic(n: int = 6000, dim: int = 1280, classes: int = 10) -> Features:
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    x = (rng.normal(size=(classes, dim))[y] + 2 * rng.normal(size=(n, dim))).astype(np.float32)
    src = Source("synthetic", ArrayImageSet(x, y), None, [str(k) for k in range(classes)])
    return Features(src, None, x, None, 0.0)  # type: ignore[arg-type]


def main(args: list[str]) -> None:
    use_config = args[:1] == ["--config"]
    overrides = args[1:] if use_config else ["protocol=iid", *args]
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose(config_name="config", overrides=["progress=false", *overrides])
    feats = extract(cfg, load_source(cfg)) if use_config else synthetic()
    rows = []
    for name in ALL_LEARNERS:
        seed_everything(int(cfg.seed))
        stream = make_stream(cfg, feats.source, int(cfg.seed))
        learner = make_learner(learner_config(name), int(feats.train.shape[1]), stream.num_classes, int(cfg.seed))
        with tempfile.TemporaryDirectory() as work, learning_threads(cfg.get("threads")):
            learner.set_workdir(work)
            t0 = time.perf_counter()
            res = run_stream(learner, feats.train, stream, int(cfg.chunk_size),
                             feats.test if feats.test is not None and len(stream.tests) else None,
                             progress=False, near_future=make_near_future(cfg))
            wall = time.perf_counter() - t0
        nf = res.near_future.summary()
        evals = max(nf["near_future_evaluations"], 1)
        rows.append([name, res.tracker.t, nf["near_future_evaluations"], wall, res.near_future_seconds,
                     100 * res.near_future_seconds / wall, 1e3 * res.learn_seconds / res.tracker.t,
                     1e3 * res.near_future_seconds / evals])
        print(f"{name}: {rows[-1][5]:.2f}% of {wall:.1f} s", file=sys.stderr)
    print(f"{feats.source.name} / {stream.name}, D={feats.train.shape[1]}; S={cfg.near_future.offset}, "
          f"every {cfg.near_future.every}, chunk {cfg.chunk_size}, threads {cfg.threads}")
    print(format_table(rows, headers=("learner", "examples", "evals", "run s", "near-future s", "% of run",
                                      "ms/step", "ms/eval")))


if __name__ == "__main__":
    main(sys.argv[1:])
