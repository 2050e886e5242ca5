"""The per-image shards of a feature-cache entry (ocl.streams.rows)."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest
import torch

from ocl.errors import OCLError
from ocl.streams.base import ArrayImageSet
from ocl.streams.cache import cache_key
from ocl.streams.features import Extractor
from ocl.streams.prefetch import extract_features
from ocl.streams.rows import RowStore


class Means(Extractor):
    """Per-channel means: (n, H, W, C) -> (n, C)."""

    feature_dim = 3

    def key(self) -> str:
        return "means/v1"

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch.astype(np.float32).mean(axis=(1, 2)))


def images(n: int = 12, seed: int = 0) -> ArrayImageSet:
    rng = np.random.default_rng(seed)
    return ArrayImageSet(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, n))


def store_of(tmp_path, ims: ArrayImageSet, dtype: str = "float32") -> RowStore:
    return RowStore(tmp_path, ims.fingerprint(), "fake/v1", len(ims), dtype)


def feats_of(idx: np.ndarray, dtype: str = "float32") -> np.ndarray:
    idx = np.asarray(idx, dtype=np.float32)
    return np.stack([idx, idx * 0.5, -idx], axis=1).astype(dtype)  # (k, 3)


def test_shards_are_found_by_a_new_store_and_read_by_source_index(tmp_path) -> None:
    ims = images()
    a = store_of(tmp_path, ims)
    a.add(np.array([7, 2, 5]), feats_of([7, 2, 5]))
    a.add(np.array([0, 11]), feats_of([0, 11]))
    np.testing.assert_array_equal(a.read(np.array([5, 0, 7])), feats_of([5, 0, 7]))
    b = store_of(tmp_path, ims)  # another process, later
    assert b.refresh() == 5 and b.shards == 2
    np.testing.assert_array_equal(b.missing(np.array([3, 2, 3, 11, 1])), [3, 1])  # order kept, each once
    np.testing.assert_array_equal(b.read(np.array([11, 2])), feats_of([11, 2]))
    with pytest.raises(KeyError, match="image 3"):
        b.read(np.array([3]))
    assert a.path == tmp_path / cache_key(ims.fingerprint(), "fake/v1")  # the full entry's key


def test_assemble_writes_the_full_entry_a_whole_extraction_writes(tmp_path) -> None:
    ims = images()
    s = store_of(tmp_path, ims, "float16")
    for part in (np.array([3, 1, 4]), np.array([0, 2, 5, 6, 7, 8, 9, 10, 11])):
        s.add(part, feats_of(part, "float16"))
    out = s.assemble(engine="local")
    np.testing.assert_array_equal(out, feats_of(np.arange(12), "float16"))
    meta = json.loads((s.path / "meta.json").read_text())
    assert meta["shards"] == 2 and meta["dtype"] == "float16" and not s.rows_dir.exists()
    assert s.full() is not None  # passes every check of the cache (sha1 included)


def test_a_corrupt_shard_is_dropped_with_a_warning(tmp_path, caplog) -> None:
    ims = images()
    s = store_of(tmp_path, ims)
    s.add(np.array([1, 2]), feats_of([1, 2]))
    s.add(np.array([3]), feats_of([3]))
    (npy,) = [p for p in sorted(s.rows_dir.glob("*.npy"))][:1]
    b = bytearray(npy.read_bytes())
    b[-3] ^= 0xFF
    npy.write_bytes(bytes(b))
    with caplog.at_level(logging.WARNING, logger="ocl.streams.rows"):
        assert store_of(tmp_path, ims).refresh() == 1
    assert "unusable" in caplog.text and not npy.exists()


def test_shards_of_another_extractor_or_dtype_are_not_taken(tmp_path) -> None:
    ims = images()
    s = store_of(tmp_path, ims)
    s.add(np.array([1]), feats_of([1]))
    other = RowStore(tmp_path, ims.fingerprint(), "fake/v1", len(ims), "float16")
    assert other.rows_dir != s.rows_dir and other.refresh() == 0
    with pytest.raises(OCLError, match="no features yet"):
        s.assemble()


def test_clean_removes_only_dead_writers_temp_files(tmp_path) -> None:
    ims = images()
    s = store_of(tmp_path, ims)
    s.add(np.array([1]), feats_of([1]))
    from ocl.files import _HOST

    dead = s.path / f".features.npy.999999999-{_HOST}.abcd1234.tmp"  # no such PID
    live = s.rows_dir / f".x.npy.{os.getpid()}-{_HOST}.abcd1234.tmp"  # this process: alive
    old = s.path / ".features.npy.k2j3h4g5.tmp"  # an earlier version's name, untouched for 2 h
    fresh = s.path / ".features.npy.q9w8e7r6.tmp"  # same, but written just now: maybe a live writer
    for p in (dead, live, old, fresh):
        p.write_bytes(b"half a file")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    s.clean()
    assert not dead.exists() and not old.exists() and live.exists() and fresh.exists()


def test_extract_features_removes_an_interrupted_writes_temp_file(tmp_path) -> None:
    ims = images()
    entry = tmp_path / cache_key(ims.fingerprint(), Means().key())
    entry.mkdir()
    leftover = entry / ".features.npy.abc123xy.tmp"
    leftover.write_bytes(b"\0" * 1000)
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    extract_features(ims, Means(), tmp_path, progress=False)
    assert sorted(p.name for p in entry.iterdir()) == ["features.npy", "meta.json"]
