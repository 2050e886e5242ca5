"""Linear-probe check of a backbone's weights on real CIFAR-10 (is the checkpoint loaded right?).

    .venv/bin/python scripts/probe_backbone.py --model efficientnet_lite0 --sizes 128 160 224

Takes a seeded subset of CIFAR-10 (``--train-per-class`` training and ``--test-per-class``
test images of each class), extracts features with the backbone at each image size, fits
scikit-learn's logistic regression on the training features (standardised, and raw) and
prints the test accuracy. With 500 test images the accuracy's sampling standard deviation
is about 0.02. ImageNet EfficientNet-Lite0 gives about 0.72 at 128-224 px (issue 12 reports
0.70-0.734 on another subset); random weights give about 0.2.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ocl.streams.base import ImageSet
from ocl.streams.cifar10 import load_cifar10
from ocl.streams.features import TimmExtractor


def subset(images: ImageSet, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` seeded images of each class: ``(n, H, W, C)`` uint8 and ``(n,)`` labels."""
    rng = np.random.default_rng(seed)
    y = images.labels
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                  for c in np.unique(y)]))
    return images.get(idx), y[idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--root", default="../shared/data/cifar10-jpg.zip", help="CIFAR-10 (any layout ocl reads)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224])
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = load_cifar10(args.root, download=False)
    x_tr, y_tr = subset(src.train, args.train_per_class, args.seed)
    x_te, y_te = subset(src.test, args.test_per_class, args.seed)
    for size in args.sizes:
        ex = TimmExtractor(args.model, weights=args.weights, image_size=size, device="cpu", threads=args.threads,
                           precision=args.precision)
        t = time.perf_counter()
        f_tr, f_te = ex(x_tr).numpy(), ex(x_te).numpy()
        dt = time.perf_counter() - t
        sc = StandardScaler().fit(f_tr)
        std = LogisticRegression(max_iter=5000).fit(sc.transform(f_tr), y_tr).score(sc.transform(f_te), y_te)
        raw = LogisticRegression(max_iter=5000).fit(f_tr, y_tr).score(f_te, y_te)
        print(f"{ex.info['model']} ({ex.info['weights'].split(':')[0]}, {ex.precision}) {size} px: "
              f"logistic-regression test accuracy "
              f"{std:.3f} (standardised features), {raw:.3f} (raw); {len(y_tr)} train / {len(y_te)} test images, "
              f"extraction {dt:.0f} s on {args.threads or torch.get_num_threads()} threads", flush=True)


if __name__ == "__main__":
    main()
