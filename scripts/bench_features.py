"""Feature-extraction throughput of a backbone on CIFAR-sized images (random weights).

    .venv/bin/python scripts/bench_features.py --model dino_vits16 --n 256

Prints images/second for the whole ``extract_features`` path (preprocess + forward),
without the disk cache. Random weights cost exactly what pretrained ones do.
"""

import argparse
import logging
import time

import numpy as np
import torch

from ocl.streams.base import ArrayImageSet
from ocl.streams.features import TimmExtractor, extract_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dino_vits16")
    ap.add_argument("--n", type=int, default=256, help="images to extract")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    ims = ArrayImageSet(rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8), np.zeros(args.n, dtype=np.int64))
    ex = TimmExtractor(args.model, weights="random", image_size=args.image_size,
                       batch_size=args.batch_size, device=args.device)
    ex(ims.data[:8])  # warm-up
    t = time.perf_counter()
    f = extract_features(ims, ex, None, batch_size=args.batch_size, progress=False)
    dt = time.perf_counter() - t
    print(f"{args.model} on {ex.device} ({torch.get_num_threads()} threads): "
          f"{args.n} images, D={f.shape[1]}, {dt:.1f} s, {args.n / dt:.1f} images/s")


if __name__ == "__main__":
    main()
