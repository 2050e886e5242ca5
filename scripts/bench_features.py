"""Feature-extraction throughput of a backbone on CIFAR-sized images, side by side.

    .venv/bin/python scripts/bench_features.py --model efficientnet_lite0 --sizes 128 160 224 \\
        --channels-last both --precision fp32 bf16 --threads 2 --repeats 3

Times the whole ``extract_features`` path (preprocess: resize of 32x32 images to S x S and
normalisation, then the forward pass), without the disk cache, for every image size,
precision and memory format asked for. The runs are interleaved (repeat 1 of every setting, then repeat
2, ...) so that load from other processes on a shared machine hits all settings alike;
the table gives the median images/s and the range over the repeats, which shows how noisy
the machine was, and the median images per CPU-second of this process (all threads), which
other processes disturb less than the wall-clock rate. It also prints, per image size, the largest difference between the
features of each setting and the first one (memory format: float rounding only; bf16:
about 1e-2). Weights default to random: they cost exactly what pretrained ones do.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch

from ocl.streams.base import ArrayImageSet
from ocl.streams.prefetch import extract_features
from ocl.streams.features import PRECISIONS, TimmExtractor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="random", help="random (default), auto or a path")
    ap.add_argument("--n", type=int, default=256, help="images per timed pass")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 224], help="image sizes S")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS,
                    help="one or more (compared side by side)")
    ap.add_argument("--channels-last", default="on", choices=["on", "off", "both"])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per setting (interleaved)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    ims = ArrayImageSet(rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8), np.zeros(args.n, dtype=np.int64))
    formats = {"on": [True], "off": [False], "both": [False, True]}[args.channels_last]

    settings = [(s, cl, p) for s in args.sizes for p in args.precision for cl in formats]
    ex = {}
    for s, cl, p in settings:
        ex[s, cl, p] = TimmExtractor(args.model, weights=args.weights, image_size=s, batch_size=args.batch_size,
                                     device=args.device, threads=args.threads, precision=p, channels_last=cl)
        ex[s, cl, p](ims.data[:args.batch_size])  # warm-up (allocator, oneDNN/cuDNN plans)
    rates: dict[tuple[int, bool, str], list[float]] = {k: [] for k in settings}
    cpu_rates: dict[tuple[int, bool, str], list[float]] = {k: [] for k in settings}
    feats = {}
    for _ in range(args.repeats):
        for k in settings:
            if ex[k].device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            feats[k] = extract_features(ims, ex[k], None, batch_size=args.batch_size, progress=False)
            rates[k].append(args.n / (time.perf_counter() - t))  # features are on the CPU: synced
            cpu_rates[k].append(args.n / (time.process_time() - c))

    first = ex[settings[0]]
    name = f"{first.info['model']} (weights {first.info['weights'].split(':')[0]})"
    threads = args.threads or torch.get_num_threads()
    print(f"{name} on {first.device} ({threads} threads), "
          f"{args.n} images of 32x32 per pass, batch {args.batch_size}, {args.repeats} interleaved repeats")
    print("| image size | precision | channels_last | images/s (median) | range over repeats | images per CPU-second |")
    print("| ---: | :---: | :---: | ---: | ---: | ---: |")
    for k in settings:
        r = rates[k]
        print(f"| {k[0]} | {ex[k].precision} | {'yes' if k[1] else 'no'} | {statistics.median(r):.0f} "
              f"| {min(r):.0f}-{max(r):.0f} | {statistics.median(cpu_rates[k]):.0f} |")
    ref = settings[0]  # differences of every other setting's features from the first one's
    for k in settings[1:]:
        if k[0] == ref[0]:
            rel = float(np.abs(feats[k] - feats[ref]).max() / np.abs(feats[ref]).max())
            print(f"size {k[0]}: {ex[k].precision}, channels_last={k[1]} changes the features by at most "
                  f"{rel:.1e} of their largest value (vs {ex[ref].precision}, channels_last={ref[1]})")


if __name__ == "__main__":
    main()
