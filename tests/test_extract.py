"""``ocl extract``: the local engine, and ``engine=ray`` (Ray Data, sharded) on a local Ray
cluster of 2 CPUs, on real CIFAR-10 images (the JPEG copy in ../shared/data)."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ocl.cli import extract_table
from ocl.errors import OCLError
from ocl.build import build
from ocl.extract import extract_sharded, run_extract
from ocl.streams.prefetch import extract_features
from ocl.streams.shards import ShardedEntry

ROOT = Path(__file__).resolve().parents[1]
CIFAR = next((p for p in (ROOT.parent / "shared/data/cifar10-jpg.zip", Path("/work/shared/data/cifar10-jpg.zip"))
              if p.is_file()), None)
TINY_VIT = {"_target_": "ocl.streams.features.TimmExtractor", "model": "vit_small_patch16_224", "weights": "random",
            "image_size": 32, "batch_size": 64, "device": "cpu",
            "model_kwargs": {"embed_dim": 24, "depth": 1, "num_heads": 2}}
#: A real conv net (random weights: the point is that sharding changes nothing), at CIFAR's size.
RESNET = {"_target_": "ocl.streams.features.TimmExtractor", "model": "resnet18", "weights": "random",
          "image_size": 32, "batch_size": 64, "device": "cpu"}

HELPERS = textwrap.dedent('''
    """Imported by name in the tests' Ray workers."""
    import functools, os, signal
    from pathlib import Path

    from ocl.streams.base import Source
    from ocl.streams.cifar10 import load_cifar10
    from ocl.streams.features import TimmExtractor
    from ocl.streams.folder import FileImageSet


    @functools.lru_cache(maxsize=None)
    def cifar_subset(root, n=256):
        """n real CIFAR-10 training images, every class, decoded lazily from their JPEG files."""
        src = load_cifar10(root, download=False)
        step = len(src.train) // n
        files = list(zip(src.train.paths, src.train.labels.tolist()))[::step][:n]
        return Source("cifar10-subset", FileImageSet(src.train.root, files), None, src.classes)


    class Dying(TimmExtractor):
        """Logs every batch (pid, images); kills its own process on its second batch, once."""

        def __init__(self, *args, log, flag, **kwargs):
            super().__init__(*args, **kwargs)
            self.log, self.flag, self.calls = log, flag, 0

        def __call__(self, batch):
            self.calls += 1
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {len(batch)}\\n")
            if self.calls == 2 and not os.path.exists(self.flag):
                Path(self.flag).touch()
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would
            return super().__call__(batch)
''')


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    (ray_cluster.modules / "extract_helpers.py").write_text(HELPERS)
    sys.path.insert(0, str(ray_cluster.modules))  # the driver builds the same things
    yield ray_cluster
    sys.path.remove(str(ray_cluster.modules))


@pytest.fixture(scope="module")
def cifar():
    if CIFAR is None:
        pytest.skip("needs the CIFAR-10 JPEG copy ../shared/data/cifar10-jpg.zip")
    return str(CIFAR)


def config(tmp_path, *overrides):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name="extract", overrides=["progress=false", f"cache_dir={tmp_path / 'cache'}",
                                                         *overrides])


def rcfg(**kw):
    return OmegaConf.merge(OmegaConf.load(ROOT / "configs/ray/default.yaml"), kw)


# ---------------------------------------------------------------- engine=local (no Ray)


def test_local_extract_fills_the_cache_and_says_where(tmp_path):
    overrides = ["backbone=dino_vits16", "backbone.weights=random", "backbone.image_size=32", "backbone.device=cpu",
                 "+backbone.model_kwargs={embed_dim:24,depth:1,num_heads:2}", "cache_dtype=float16"]
    rows = run_extract(config(tmp_path, *overrides))
    assert [(r["split"], r["images"], r["feature_dim"], r["dtype"], r["cached"]) for r in rows] == [
        ("train", 1437, 24, "float16", False), ("test", 360, 24, "float16", False)]
    table = extract_table(rows)
    assert "train cache: " + rows[0]["path"] in table and "float16" in table
    assert json.loads((Path(rows[0]["path"]) / "meta.json").read_text())["dtype"] == "float16"
    again = run_extract(config(tmp_path, *overrides))
    assert [r["cached"] for r in again] == [True, True] and "cached" in extract_table(again)


def test_extract_refuses_what_it_cannot_cache(tmp_path):
    with pytest.raises(OCLError, match="nothing to extract"):
        run_extract(config(tmp_path))  # backbone=pixels: never cached
    with pytest.raises(OCLError, match="cache_dir is null"):
        run_extract(config(tmp_path, "cache_dir=null"))
    with pytest.raises(OCLError, match="engine='spark'"):
        run_extract(config(tmp_path, "engine=spark"))
    with pytest.raises(OCLError, match="cache_dtype='float8'"):
        run_extract(config(tmp_path, "cache_dtype=float8"))


def test_engine_ray_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as without the extra
    with pytest.raises(OCLError, match=r'pip install -e "\.\[ray\]"'):
        run_extract(config(tmp_path, "engine=ray"))
    assert not (tmp_path / "cache").exists()  # refused before any work


# ---------------------------------------------------------------- engine=ray


def test_sharded_extraction_equals_the_single_process_one(cluster, cifar, tmp_path, caplog):
    """A real conv net over 256 real images, 2 Ray workers, 4 shards of 64."""
    stream = ["stream=custom", "stream._target_=extract_helpers.cifar_subset", f"+stream.root={cifar}"]
    backbone = ["backbone=dino_vits16", "backbone.model=resnet18", "backbone.weights=random", "backbone.image_size=32",
                "backbone.device=cpu", "eval_test=false"]
    ray_rows = run_extract(config(tmp_path / "ray", *stream, *backbone, "engine=ray", "ray.shard_size=64"))
    local_rows = run_extract(config(tmp_path / "local", *stream, *backbone))
    assert [r["split"] for r in ray_rows] == ["train"] and ray_rows[0]["images"] == 256
    ray_feats = np.load(Path(ray_rows[0]["path"]) / "features.npy", mmap_mode="r")
    local_feats = np.load(Path(local_rows[0]["path"]) / "features.npy", mmap_mode="r")
    assert ray_feats.shape == local_feats.shape == (256, 512)
    np.testing.assert_allclose(ray_feats, local_feats, rtol=1e-5, atol=1e-6)  # only batch boundaries differ
    assert Path(ray_rows[0]["path"]).name == Path(local_rows[0]["path"]).name  # one cache key, whatever the engine
    meta = json.loads((Path(ray_rows[0]["path"]) / "meta.json").read_text())
    assert meta["engine"] == "ray" and meta["shards"] == 4 and not (Path(ray_rows[0]["path"]) / "shards").exists()
    # ocl run / ocl compare read the entry like one they wrote: a cache hit
    src = __import__("extract_helpers").cifar_subset(cifar)
    ex = build(OmegaConf.create({"backbone": RESNET}), "backbone")
    with caplog.at_level(logging.INFO, logger="ocl.streams"):
        again = extract_features(src.train, ex, tmp_path / "ray" / "cache", progress=False)
    assert "feature cache hit" in caplog.text
    np.testing.assert_array_equal(again, ray_feats)


def test_a_killed_worker_and_an_interrupted_run_lose_only_their_shards(cluster, cifar, tmp_path):
    """An earlier run stopped after shard 1; in this one the worker is SIGKILLed on its second
    shard. Ray Data restarts it and redoes that shard; nothing else is recomputed."""
    import extract_helpers

    images = extract_helpers.cifar_subset(cifar).train
    log, flag = tmp_path / "calls.log", tmp_path / "killed"
    dying = {**TINY_VIT, "_target_": "extract_helpers.Dying", "log": str(log), "flag": str(flag)}
    ex = build(OmegaConf.create({"backbone": dying}), "backbone")
    entry = ShardedEntry(tmp_path / "cache", images.fingerprint(), ex.key(), len(images), "float16")
    shards = entry.plan(64)
    plain = build(OmegaConf.create({"backbone": TINY_VIT}), "backbone")  # the same key, no logging
    entry.write(shards[1], images, plain)

    out = extract_sharded(images, ex, dying, str(tmp_path / "cache"), "float16", rcfg(extract_workers=1, shard_size=64),
                          progress=False)
    calls = [int(line.split()[1]) for line in log.read_text().splitlines()]
    pending = [len(sh) for sh in shards if sh.index != 1]  # 64, 64, 64
    assert flag.exists() and len(calls) == len(pending) + 1  # each pending shard once, plus the killed attempt
    assert sum(calls) == sum(pending) + 64
    local = extract_features(images, plain, tmp_path / "local", progress=False, dtype="float16")
    assert out.dtype == np.float16 and out.shape == (256, 24)
    np.testing.assert_allclose(out.astype(np.float32), local.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_a_stopped_extraction_says_how_to_resume_or_passes_the_users_error_on(tmp_path):
    from ocl.extract import stopped_error
    from ocl.streams.shards import plan_shards

    entry = ShardedEntry(tmp_path, "fp", "key", 10, "float32")
    shards = entry.plan(4)
    lost = stopped_error(RuntimeError("ActorDiedError: the actor died unexpectedly\nmore"), entry, shards)
    assert "0 of 3 shards are written" in str(lost) and "run the same command again" in str(lost)
    assert shards == plan_shards(10, 4)
    nan = OCLError("the feature extractor produced NaN/inf (first at image 6)")
    wrapped = RuntimeError("UserCodeException")
    wrapped.__cause__ = nan  # how Ray hands a worker's exception back
    assert str(stopped_error(wrapped, entry, shards)) == str(nan)
    remote = RuntimeError(f"ray::MapWorker(...)\nocl.errors.OCLError: {nan}\n\nThe above exception was the direct "
                          "cause of the following exception:\n\nray.exceptions.UserCodeException: UDF failed")
    assert str(stopped_error(remote, entry, shards)) == str(nan)  # the text Ray Data hands back
    full = RuntimeError("ray::MapWorker(...)\nocl.errors.StorageError: no space left on the device of /c\n\n"
                        "The above exception was the direct cause of the following exception:\n\nUserCodeException")
    assert str(stopped_error(full, entry, shards)) == "no space left on the device of /c"
