"""A cache entry built from shards (what ``ocl extract engine=ray`` writes), without Ray:
the shards are written here, in this process, as the Ray workers write them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ocl.errors import OCLError
from ocl.streams.base import ArrayImageSet
from ocl.streams.prefetch import extract_features
from ocl.streams.features import PixelExtractor
from ocl.streams.shards import Shard, ShardedEntry, SliceImageSet, plan_shards


class CachedPixels(PixelExtractor):
    """Pixels, cached (exact and cheap: the point here is the cache, not the model)."""

    cacheable = True


def images(n: int = 23, seed: int = 0) -> ArrayImageSet:
    rng = np.random.default_rng(seed)
    return ArrayImageSet(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, n))


def entry_for(tmp_path, ims, dtype="float32") -> ShardedEntry:
    return ShardedEntry(tmp_path, ims.fingerprint(), CachedPixels().key(), len(ims), dtype)


def write_all(entry: ShardedEntry, shards, ims, only=None) -> None:
    ex = CachedPixels()
    for sh in shards:
        if only is None or sh.index in only:
            entry.write(sh, ims, ex, batch_size=4)


def test_plan_covers_every_image_once() -> None:
    assert plan_shards(10, 4) == [Shard(0, 0, 4), Shard(1, 4, 8), Shard(2, 8, 10)]
    assert plan_shards(8, 8) == [Shard(0, 0, 8)]
    with pytest.raises(OCLError, match="shard_size=0"):
        plan_shards(5, 0)


def test_slice_reads_its_own_images() -> None:
    ims = images()
    part = SliceImageSet(ims, 5, 9)
    assert len(part) == 4
    np.testing.assert_array_equal(part.get(np.array([0, 3])), ims.data[[5, 8]])
    np.testing.assert_array_equal(part.labels, ims.labels[5:9])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_assembled_entry_is_the_single_process_entry(tmp_path, dtype) -> None:
    ims = images()
    entry = entry_for(tmp_path / "sharded", ims, dtype)
    shards = entry.plan(shard_size=5)
    assert len(shards) == 5 and not entry.complete()
    write_all(entry, shards, ims)
    out = entry.assemble(shards, engine="test")
    assert out.dtype == np.dtype(dtype) and not out.flags.writeable
    assert not entry.shards_dir.exists()  # the shards are gone once the entry is whole

    local = extract_features(ims, CachedPixels(), tmp_path / "local", progress=False, dtype=dtype)
    np.testing.assert_array_equal(out, local)
    meta = json.loads((entry.path / "meta.json").read_text())
    local_meta = json.loads((entry.path.parent.parent / "local" / entry.path.name / "meta.json").read_text())
    assert meta["sha1"] == local_meta["sha1"] and meta["n_bytes"] == local_meta["n_bytes"]  # the same bytes
    assert meta["shards"] == 5 and meta["engine"] == "test" and meta["dtype"] == dtype
    # ocl run reads it like any other entry: a hit, no extraction
    class Refuses(CachedPixels):
        def __call__(self, batch):
            raise AssertionError("a complete entry must not be recomputed")

    np.testing.assert_array_equal(extract_features(ims, Refuses(), tmp_path / "sharded", progress=False, dtype=dtype),
                                  local)
    assert entry.complete()


def test_an_interrupted_build_keeps_its_shards_and_its_plan(tmp_path) -> None:
    ims = images()
    entry = entry_for(tmp_path, ims)
    shards = entry.plan(shard_size=5)
    write_all(entry, shards, ims, only={0, 3})
    (entry.shards_dir / "000001.npy").write_bytes(b"half a shard")  # written, but no .json: not done
    (entry.shards_dir / ".000002-x.npy.tmp").write_bytes(b"a temp file")

    again = entry_for(tmp_path, ims)  # a new run (a new process)
    resumed = again.plan(shard_size=7)  # another shard size: the first run's plan wins
    assert resumed == shards and again.done(resumed) == {0, 3}
    with pytest.raises(OCLError, match="3 of 5 shards .* missing"):
        again.assemble(resumed)
    assert not (again.path / "meta.json").exists()
    write_all(again, resumed, ims, only={1, 2, 4})
    np.testing.assert_array_equal(again.assemble(resumed), ims.data.reshape(len(ims), -1) / np.float32(255))


def test_a_corrupt_shard_is_removed_and_recomputed_on_the_next_run(tmp_path) -> None:
    ims = images()
    entry = entry_for(tmp_path, ims)
    shards = entry.plan(shard_size=5)
    write_all(entry, shards, ims)
    npy = entry.shards_dir / "000002.npy"
    b = bytearray(npy.read_bytes())
    b[-3] ^= 0xFF
    npy.write_bytes(bytes(b))
    with pytest.raises(OCLError, match="shard 2 .* sha1 .* run the same command again"):
        entry.assemble(shards)
    assert not (entry.path / "meta.json").exists() and not (entry.path / "features.npy").exists()
    assert entry.done(shards) == {0, 1, 3, 4}
    write_all(entry, shards, ims, only={2})
    np.testing.assert_array_equal(entry.assemble(shards), extract_features(ims, CachedPixels(), None, progress=False))


def test_a_plan_of_other_images_is_discarded(tmp_path) -> None:
    ims = images()
    entry = entry_for(tmp_path, ims)
    shards = entry.plan(shard_size=5)
    write_all(entry, shards, ims, only={0})
    plan = json.loads((entry.shards_dir / "plan.json").read_text())
    (entry.shards_dir / "plan.json").write_text(json.dumps({**plan, "n": 99}))
    assert entry.plan(shard_size=5) == shards and entry.done(shards) == set()  # started again


def test_a_full_disk_is_one_clear_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno
    import os

    ims = images()
    entry = entry_for(tmp_path, ims)
    shards = entry.plan(shard_size=5)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OCLError, match="no space left .* while writing shard 0 of the feature cache"):
        write_all(entry, shards, ims, only={0})
    assert sorted(p.name for p in entry.shards_dir.iterdir()) == ["plan.json"]
