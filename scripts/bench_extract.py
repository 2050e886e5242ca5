"""Feature-extraction throughput: the local engine vs ``engine=ray`` with 1 and 2 workers.

    .venv/bin/python scripts/bench_extract.py --n 384 --rounds 2      # needs pip install -e ".[ray]"
    .venv/bin/python scripts/bench_extract.py --decode-only           # JPEG decode rate of one process

Side by side in one script, on real CIFAR-10 images (JPEG files decoded by the workers),
through the whole ``ocl extract`` path (decode, preprocess, forward, write the cache;
for Ray also starting the actor pool and building one model per worker, but not starting
the cluster), each configuration into a fresh cache, the configurations interleaved
``--rounds`` times. Every configuration uses all ``--cpus`` cores: the local engine
with that many torch threads, one Ray worker with all of them, or N workers with
``cpus / N`` each. Random weights cost exactly what pretrained ones do.
Ray's figures are given twice: end to end, and once up (images / the time from the first
shard's start to the last shard's end: what a long extraction approaches).
Prints a table and writes it (and the raw times) to ``--out``.

``--decode-only`` measures what bounds a fast GPU instead: how many JPEGs one process
decodes per second (PIL, as the image-folder source reads them) at CIFAR's 32 px and at
224 and 480 px (a CIFAR image resized and re-encoded at quality 90).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ocl.build import build
from ocl.extract import extract_sharded
from ocl.report import format_table
from ocl.streams.cifar10 import load_cifar10
from ocl.streams.prefetch import extract_features
from ocl.streams.folder import FileImageSet

ROOT = Path(__file__).resolve().parents[1]


class RayRate(logging.Handler):
    """Keeps the rate ocl.extract logs after each Ray extraction (all workers, once up)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rates: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "from the first shard's start" in record.msg:
            self.rates.append(float(record.args[2]))


def decode_rates(data: str, out: Path, n: int = 300) -> None:
    """JPEG decode rate of one process at 32 (CIFAR as stored), 224 and 480 px."""
    import io

    import numpy as np
    from PIL import Image

    src = load_cifar10(data, download=False)
    path = os.path.join(src.train.root, src.train.paths[0])
    rows = []
    for side in (32, 224, 480):
        with Image.open(path) as im:
            buf = io.BytesIO()
            (im if side == 32 else im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)).save(
                buf, "JPEG", quality=90)
        blob = buf.getvalue()
        t0 = time.perf_counter()
        for _ in range(n):
            with Image.open(io.BytesIO(blob)) as im:
                np.asarray(im.convert("RGB"))
        rows.append((f"{side}x{side}", f"{n / (time.perf_counter() - t0):,.0f}"))
    table = (f"JPEG decode, one process (PIL), host {platform.node()}, load average {os.getloadavg()[0]:.1f}\n"
             + format_table(rows, headers=("image", "img/s"), align="lr"))
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.txt").write_text(table + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10-jpg.zip", help="the CIFAR-10 JPEG zip (see ../shared/data)")
    ap.add_argument("--model", default="dino_vits16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--n", type=int, default=384, help="images (every 50000/n-th training image)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "scripts/results/bench_extract"))
    ap.add_argument("--decode-only", action="store_true", help="only the JPEG decode rate of one process")
    args = ap.parse_args()
    if args.decode_only:
        decode_rates(args.data, Path(args.out))
        return
    logging.basicConfig(level=logging.WARNING)
    rate = RayRate()
    logging.getLogger("ocl.extract").addHandler(rate)
    logging.getLogger("ocl.extract").setLevel(logging.INFO)
    import ray

    src = load_cifar10(args.data, download=False)
    files = list(zip(src.train.paths, src.train.labels.tolist()))[:: len(src.train) // args.n][: args.n]
    images = FileImageSet(src.train.root, files)
    backbone = {"_target_": "ocl.streams.features.TimmExtractor", "model": args.model, "weights": "random",
                "image_size": args.image_size, "batch_size": 64, "device": "cpu"}
    extractor = build(OmegaConf.create({"backbone": backbone}), "backbone")
    shard = max(1, args.n // 8)
    rcfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs/ray/default.yaml"), {"shard_size": shard})
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    configs = {"local": None, "ray, 1 worker": 1, "ray, 2 workers": 2}
    times: dict[str, list[float]] = {k: [] for k in configs}
    steady: dict[str, list[float]] = {k: [] for k in configs}  # img/s once the first worker is up
    load = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, workers in configs.items():
                cache = Path(tmp) / f"{r}-{name.replace(' ', '').replace(',', '-')}"
                load.append(os.getloadavg()[0])
                t0 = time.perf_counter()
                if workers is None:
                    torch.set_num_threads(args.cpus)
                    extract_features(images, extractor, cache, progress=False)
                else:
                    cfg = OmegaConf.merge(rcfg, {"extract_workers": workers, "extract_cpus": args.cpus // workers})
                    extract_sharded(images, extractor, backbone, str(cache), "float32", cfg, progress=False)
                times[name].append(time.perf_counter() - t0)
                if workers is not None:
                    steady[name].append(rate.rates[-1])
                print(f"round {r}: {name}: {args.n / times[name][-1]:.1f} img/s end to end"
                      + (f", {steady[name][-1]:.1f} once up" if workers else ""), flush=True)
    ray.shutdown()
    rows = [(name, ", ".join(f"{args.n / t:.1f}" for t in ts), ", ".join(f"{v:.1f}" for v in steady[name]) or "-")
            for name, ts in times.items()]
    head = (f"{args.model} (random weights) at {args.image_size}px, {args.n} CIFAR-10 JPEGs, shards of {shard}, "
            f"{args.cpus} CPUs per configuration, host {platform.node()}, load average {min(load):.1f}-{max(load):.1f} "
            f"(a shared machine); img/s per round")
    table = head + "\n" + format_table(rows, headers=("engine", "end to end", "workers once up"), align="lll")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}_{args.image_size}.txt").write_text(table + "\n")
    (out / f"{args.model}_{args.image_size}.json").write_text(json.dumps(
        {"args": vars(args), "seconds": times, "steady_img_per_s": steady, "load_average": load, "torch": torch.__version__,
         "ray": ray.__version__}, indent=1))


if __name__ == "__main__":
    main()
