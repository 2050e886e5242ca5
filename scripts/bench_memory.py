"""Peak memory of a prequential run as the stream grows: 10k, 100k, 1M examples.

Each size runs in a fresh process (peak RSS is per process): a synthetic stream of random
D-dim features (written to a memory-mapped .npy like the feature cache, block by block),
the real runner, an on-disk per-step Tracker and, for the transformer, its on-disk replay
history. Reported from /proc/self/status: VmHWM (peak RSS), RssAnon (heap; sampled every
10k steps, max kept) and RssFile at the end; plus the RSS after setup (imports, stream
index arrays: 24 bytes/example for order, labels and tasks) so the growth of the loop is
visible on its own.

    .venv/bin/python scripts/bench_memory.py                       # linear, 10k/100k/1M
    .venv/bin/python scripts/bench_memory.py --learner transformer --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def status() -> dict[str, int]:
    """Memory fields of /proc/self/status in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) / 1024
    return out


def one(n: int, learner_name: str, dim: int, classes: int, chunk: int) -> dict:
    import torch

    from ocl.tracker import Tracker
    from ocl.runner import RunState, run_stream
    from ocl.streams.protocols import Stream

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="ocl-bench-mem-")
    path = os.path.join(work, "features.npy")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    del mm  # written below with plain file writes: creating the data set must not inflate RSS
    with open(path, "r+b") as f:
        f.seek(0, 2)
        header = f.tell() - n * dim * 4
        for s in range(0, n, 1 << 16):
            y = labels[s : s + (1 << 16)]
            block = centers[y] + rng.normal(size=(y.size, dim)).astype(np.float32)
            f.seek(header + s * dim * 4)
            f.write(block.astype(np.float32).tobytes())
    feats = np.load(path, mmap_mode="r")
    stream = Stream("iid", rng.permutation(n), np.zeros(n, np.int64), np.zeros(n, np.int64), classes)
    stream.labels = labels[stream.order].astype(np.int64)
    if learner_name == "linear":
        from ocl.learners.linear import LinearLearner

        learner = LinearLearner(dim, classes)
    else:
        from ocl.learners.transformer import TransformerLearner

        learner = TransformerLearner(dim, classes, d_model=32, window=16, replay_streams=4)
    learner.set_workdir(work)
    tracker = Tracker(n, stream.tasks, path=os.path.join(work, "steps.npy"))
    setup = status()
    peak_anon = [setup["RssAnon"]]

    def sample(state: RunState) -> None:
        if state.steps % 10_000 < chunk:
            peak_anon.append(status()["RssAnon"])

    t0 = time.perf_counter()
    res = run_stream(learner, feats, stream, chunk, progress=False, on_chunk=sample, tracker=tracker)
    dt = time.perf_counter() - t0
    s = res.tracker.summary()
    end = status()
    return {"n": n, "learner": learner_name, "chunk": chunk, "seconds": round(dt, 1),
            "examples_per_s": round(n / dt), "accuracy": round(s["avg_online_accuracy"], 4),
            "rss_after_setup_mib": round(setup["VmRSS"], 1), "peak_rss_mib": round(end["VmHWM"], 1),
            "peak_anon_mib": round(max(peak_anon), 1), "rss_file_end_mib": round(end["RssFile"], 1),
            "stream_index_mib": round(3 * 8 * n / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learner", default="linear", choices=["linear", "transformer"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=10, help="C; memory does not depend on it, time does")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.learner, args.dim, args.classes, args.chunk)))
        return
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--learner", args.learner, "--dim", str(args.dim),
               "--classes", str(args.classes), "--chunk", str(args.chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)


if __name__ == "__main__":
    main()
