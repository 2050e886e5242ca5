"""Feature extractors and the on-disk feature cache (tiny models, no network)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.streams.base import ArrayImageSet
from ocl.streams.cache import cache_key
from ocl.streams.prefetch import extract_features
from ocl.streams.features import Extractor, PixelExtractor, TimmExtractor, make_extractor

TINY = dict(embed_dim=24, depth=1, num_heads=2)


def images(n: int = 10, h: int = 8, c: int = 3, seed: int = 0) -> ArrayImageSet:
    rng = np.random.default_rng(seed)
    return ArrayImageSet(rng.integers(0, 256, (n, h, h, c), dtype=np.uint8), rng.integers(0, 3, n))


class Counting(Extractor):
    """Per-channel means (n, H, W, C) -> (n, C): cheap, exact, and counts its calls."""

    def __init__(self, tag: str = "a", nan_at: int | None = None) -> None:
        self.tag, self.nan_at, self.calls, self.seen = tag, nan_at, 0, 0

    @property
    def feature_dim(self) -> int:
        return 3

    def key(self) -> str:
        return f"counting/{self.tag}"

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        self.calls += 1
        out = torch.from_numpy(batch.astype(np.float32).mean(axis=(1, 2)))  # (n, C)
        if self.nan_at is not None and self.seen <= self.nan_at < self.seen + len(batch):
            out[self.nan_at - self.seen, 0] = float("nan")
        self.seen += len(batch)
        return out


def expected(ims: ArrayImageSet) -> np.ndarray:
    return ims.data.astype(np.float32).mean(axis=(1, 2))


def entry_of(cache: Path, ims: ArrayImageSet, ex: Extractor) -> Path:
    return cache / cache_key(ims.fingerprint(), ex.key())


# --- cache ---------------------------------------------------------------------------


def test_miss_then_hit_does_no_extractor_work(tmp_path) -> None:
    ims = images()
    ex = Counting()
    a = extract_features(ims, ex, tmp_path, batch_size=4, progress=False)
    assert ex.calls == 3  # 10 images in batches of 4
    np.testing.assert_array_equal(a, expected(ims))
    assert isinstance(a, np.memmap) and not a.flags.writeable and a.dtype == np.float32

    entry = entry_of(tmp_path, ims, ex)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["shape"] == [10, 3] and meta["dtype"] == "float32"
    assert meta["fingerprint"] == ims.fingerprint() and meta["extractor"] == ex.key()
    assert {"sha1", "created"} <= set(meta)
    assert sorted(p.name for p in entry.iterdir()) == ["features.npy", "meta.json"]  # no temp files

    fresh = Counting()  # a new process would build a new extractor with the same key
    b = extract_features(ims, fresh, tmp_path, batch_size=4, progress=False)
    assert fresh.calls == 0
    np.testing.assert_array_equal(a, b)


def test_changed_images_or_extractor_is_a_miss(tmp_path) -> None:
    ims, ex = images(), Counting()
    extract_features(ims, ex, tmp_path, progress=False)
    other = images(seed=1)
    extract_features(other, ex, tmp_path, progress=False)
    assert ex.calls == 2
    ex_b = Counting(tag="b")
    extract_features(ims, ex_b, tmp_path, progress=False)
    assert ex_b.calls == 1
    relabelled = ArrayImageSet(ims.data, (ims.labels + 1) % 3)  # labels are part of the fingerprint
    extract_features(relabelled, ex, tmp_path, progress=False)
    assert ex.calls == 3
    assert len(list(tmp_path.iterdir())) == 4


def _flip(entry: Path) -> None:
    p = entry / "features.npy"
    b = bytearray(p.read_bytes())
    b[-5] ^= 0xFF  # inside the data, not the header
    p.write_bytes(bytes(b))


def _truncate(entry: Path) -> None:
    p = entry / "features.npy"
    p.write_bytes(p.read_bytes()[:-12])


def _drop_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


def _meta_of_other_shape(entry: Path) -> None:
    # the meta.json a 3-image run would have written: a different shape and byte count
    other = entry.parent / "other"
    extract_features(images(n=3), Counting(), other, progress=False)
    (src,) = list(other.iterdir())
    meta = json.loads((src / "meta.json").read_text())
    meta.update(fingerprint=json.loads((entry / "meta.json").read_text())["fingerprint"])
    (entry / "meta.json").write_text(json.dumps(meta))


def _garbage_meta(entry: Path) -> None:
    (entry / "meta.json").write_text("{not json")


def _corrupt_header(entry: Path) -> None:
    p = entry / "features.npy"
    b = bytearray(p.read_bytes())
    b[:6] = b"XXXXXX"  # the .npy magic
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("corrupt,why", [
    (_flip, "sha1"),
    (_truncate, "bytes"),
    (_drop_meta, "meta.json is missing"),
    (_meta_of_other_shape, "shape"),
    (_garbage_meta, "unreadable"),
    (_corrupt_header, "unreadable"),
], ids=["flipped-bytes", "truncated", "missing-meta", "other-shape-meta", "garbage-meta", "bad-header"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, caplog, corrupt, why) -> None:
    cache = tmp_path / "cache"
    ims, ex = images(), Counting()
    extract_features(ims, ex, cache, progress=False)
    corrupt(entry_of(cache, ims, ex))

    with caplog.at_level(logging.WARNING, logger="ocl.streams.cache"):
        out = extract_features(ims, ex, cache, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0] and "rebuilding" in warnings[0]
    assert ex.calls == 2  # rebuilt, not used
    np.testing.assert_array_equal(out, expected(ims))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ocl.streams.cache"):
        extract_features(ims, ex, cache, progress=False)
    assert ex.calls == 2 and not caplog.records  # the rebuilt cache is clean


def test_nan_features_raise_and_cache_only_the_batches_before(tmp_path) -> None:
    ims = images()
    with pytest.raises(OCLError, match="NaN/inf .*image 6.*its batch was not cached"):
        extract_features(ims, Counting(nan_at=6), tmp_path, batch_size=4, progress=False)
    entry = entry_of(tmp_path, ims, Counting())
    assert not (entry / "features.npy").exists() and not (entry / "meta.json").exists()
    assert len(list((entry / "rows").glob("*.json"))) == 1  # images 0-3, finished before the bad batch
    good = Counting()
    out = extract_features(ims, good, tmp_path, batch_size=4, progress=False)
    assert good.seen == 6  # only the images no shard held
    np.testing.assert_array_equal(out, expected(ims))
    with pytest.raises(OCLError, match="NaN"):
        extract_features(ims, Counting(nan_at=0), None, progress=False)


def test_no_cache_dir_computes_in_memory(tmp_path) -> None:
    ims, ex = images(), Counting()
    a = extract_features(ims, ex, None, batch_size=3, progress=False)
    b = extract_features(ims, ex, None, batch_size=3, progress=False)
    assert ex.calls == 8 and not isinstance(a, np.memmap)
    np.testing.assert_array_equal(a, b)


def test_throughput_is_logged(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="ocl.streams"):
        extract_features(images(), Counting(), tmp_path, progress=False)
    assert any("images/s" in r.getMessage() for r in caplog.records)


# --- pixels --------------------------------------------------------------------------


def test_pixel_extractor_images_and_vectors(tmp_path) -> None:
    ims = images(n=4, h=5, c=1)
    ex = PixelExtractor()
    out = extract_features(ims, ex, tmp_path, progress=False)
    assert out.shape == (4, 25) and out.dtype == np.float32 and ex.feature_dim == 25
    np.testing.assert_allclose(out, ims.data.reshape(4, -1) / 255.0, rtol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    assert list(tmp_path.iterdir()) == []  # not cacheable: nothing written

    vecs = np.random.default_rng(0).standard_normal((6, 7)).astype(np.float32)
    out = extract_features(ArrayImageSet(vecs, np.zeros(6)), PixelExtractor(), tmp_path, progress=False)
    np.testing.assert_array_equal(out, vecs)


def test_make_extractor() -> None:
    assert isinstance(make_extractor("pixels"), PixelExtractor)
    with pytest.raises(OCLError, match="takes no options"):
        make_extractor("pixels", image_size=32)
    ex = make_extractor("vit_small_patch16_224", weights="random", image_size=32, model_kwargs=TINY, device="cpu")
    assert isinstance(ex, TimmExtractor) and ex.feature_dim == 24
    with pytest.raises(OCLError, match="invalid option"):
        make_extractor("vit_small_patch16_224", weights="random", no_such_option=1)


# --- timm ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit() -> TimmExtractor:
    return TimmExtractor("vit_small_patch16_224", weights="random", image_size=32,
                         batch_size=4, device="cpu", model_kwargs=TINY)


def test_timm_extractor_shapes_cache_and_info(tiny_vit, tmp_path) -> None:
    assert tiny_vit.info["weights"] == "random" and tiny_vit.feature_dim == 24
    ims = images(n=9, h=20, c=1)  # grayscale, resized 20 -> 32
    out = extract_features(ims, tiny_vit, tmp_path, batch_size=5, progress=False)
    assert out.shape == (9, 24) and out.dtype == np.float32 and np.isfinite(out).all()
    again = extract_features(ims, tiny_vit, tmp_path, batch_size=5, progress=False)
    np.testing.assert_array_equal(out, again)
    assert len(list(tmp_path.iterdir())) == 1


def test_timm_preprocessing(tiny_vit) -> None:
    gray = images(n=3, h=16, c=1).data
    rgb = np.repeat(gray, 3, axis=-1)
    torch.testing.assert_close(tiny_vit(gray), tiny_vit(rgb))  # grayscale -> 3 channels
    x = tiny_vit.preprocess(rgb)
    assert x.shape == (3, 3, 32, 32)
    # sub-batching (batch_size=4) must not change results
    many = images(n=7, h=32).data
    torch.testing.assert_close(tiny_vit(many), torch.cat([tiny_vit(many[i:i + 1]) for i in range(7)]),
                               rtol=1e-5, atol=1e-5)
    # at native size no resize happens: plain (x/255 - mean) / std
    ref = (torch.from_numpy(many).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # this arch: mean=std=0.5
    torch.testing.assert_close(tiny_vit.preprocess(many), ref)


def test_timm_extractor_rejects_feature_vectors(tiny_vit) -> None:
    with pytest.raises(OCLError, match="pixels"):
        tiny_vit(np.zeros((2, 5), np.float32))


def test_timm_key_tracks_weights_and_preprocessing(tiny_vit) -> None:
    other_size = TimmExtractor("vit_small_patch16_224", weights="random", image_size=48,
                               device="cpu", model_kwargs=TINY)
    assert other_size.key() != tiny_vit.key()
    same = TimmExtractor("vit_small_patch16_224", weights="random", image_size=32,
                         batch_size=64, device="cpu", model_kwargs=TINY)
    assert same.key() == tiny_vit.key()  # batch size does not change features


def test_timm_options_are_checked() -> None:
    for bad, match in [(dict(precision="fp16"), "backbone.precision"), (dict(threads=0), "backbone.threads"),
                       (dict(threads=True), "backbone.threads"), (dict(channels_last="yes"), "backbone.channels_last")]:
        with pytest.raises(OCLError, match=match):
            TimmExtractor("vit_small_patch16_224", weights="random", image_size=32, device="cpu",
                          model_kwargs=TINY, **bad)


def test_timm_threads_apply_during_extraction_and_are_restored(monkeypatch) -> None:
    ex = TimmExtractor("vit_small_patch16_224", weights="random", image_size=32, device="cpu",
                       model_kwargs=TINY, threads=1)
    seen = []
    forward = ex.net.forward
    monkeypatch.setattr(ex.net, "forward", lambda x: (seen.append(torch.get_num_threads()), forward(x))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert ex(images(n=3, h=32).data).shape == (3, 24)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_timm_precision_and_memory_format_in_key(tiny_vit) -> None:
    """bf16 changes the features (own cache entry); channels_last only rounds (same entry)."""
    def make(**kw) -> TimmExtractor:
        return TimmExtractor("vit_small_patch16_224", weights="random", image_size=32, device="cpu",
                             model_kwargs=TINY, **kw)

    assert tiny_vit.precision == "fp32" and tiny_vit.info["precision"] == "fp32"  # the default
    assert not tiny_vit.channels_last  # auto on CPU
    assert make(precision="auto").precision == "fp32"  # auto on CPU
    fp32, cl, bf16 = make(precision="fp32"), make(channels_last=True), make(precision="bf16")
    assert cl.channels_last and cl.net.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert fp32.key() == tiny_vit.key() == cl.key()
    assert bf16.key() != fp32.key() and bf16.info["precision"] == "bf16"
    assert '"precision"' not in fp32.key()  # fp32 keys are those of earlier versions: old caches stay valid
    x = images(n=4, h=32).data
    torch.testing.assert_close(cl(x), tiny_vit(x), rtol=1e-5, atol=1e-5)
    a, b = fp32(x), bf16(x)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert F.cosine_similarity(a, b).min() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_timm_gpu_bf16_channels_last_matches_cpu() -> None:
    cpu = TimmExtractor("efficientnet_lite0", image_size=96, device="cpu")
    gpu = TimmExtractor("efficientnet_lite0", image_size=96, device="cuda", precision="auto")  # bf16 + channels_last
    assert gpu.precision == "bf16" and gpu.channels_last and gpu.key() != cpu.key()
    assert TimmExtractor("efficientnet_lite0", image_size=96, device="cuda").key() == cpu.key()  # fp32 default
    assert gpu.info["weights_sha1"] == cpu.info["weights_sha1"]
    x = images(n=16, h=32).data
    a, b = cpu(x), gpu(x)
    assert b.device.type == "cpu" and b.dtype == torch.float32 and b.shape == (16, 1280)
    assert F.cosine_similarity(a, b).min() > 0.98


# --- storage dtype -------------------------------------------------------------------


def test_float16_storage_halves_the_cache_and_is_its_own_entry(tmp_path) -> None:
    ims = images(n=50)
    ex = Counting()
    full = extract_features(ims, ex, tmp_path, progress=False)
    half = extract_features(ims, ex, tmp_path, progress=False, dtype="float16")
    assert ex.calls == 2  # a separate entry: float32 features never vouch for float16 ones
    assert isinstance(half, np.memmap) and half.dtype == np.float16
    np.testing.assert_array_equal(half, expected(ims).astype(np.float16))  # rounded once, when written
    f32, f16 = entry_of(tmp_path, ims, ex), tmp_path / cache_key(ims.fingerprint(), ex.key(), "float16")
    assert f16 != f32 and f32.name == cache_key(ims.fingerprint(), ex.key())  # float32 keys are unchanged
    meta = json.loads((f16 / "meta.json").read_text())
    assert meta["dtype"] == "float16" and meta["format"] == 2
    header = 128  # .npy header of a small 2-d array
    assert (f16 / "features.npy").stat().st_size - header == ((f32 / "features.npy").stat().st_size - header) // 2
    again = extract_features(ims, Counting(), tmp_path, progress=False, dtype="float16")
    np.testing.assert_array_equal(again, half)
    np.testing.assert_array_equal(full, expected(ims))


def test_float16_overflow_is_refused_and_caches_nothing(tmp_path) -> None:
    class Big(Counting):
        def __call__(self, batch: np.ndarray) -> torch.Tensor:
            return super().__call__(batch) * 1000.0

    ims, big = images(), Big()
    np.testing.assert_array_equal(extract_features(ims, big, tmp_path, progress=False), expected(ims) * 1000.0)
    with pytest.raises(OCLError, match="exceed the range of cache_dtype=float16.*cache_dtype=float32"):
        extract_features(ims, big, tmp_path, progress=False, dtype="float16")  # means up to 255k > 65504
    assert not (tmp_path / cache_key(ims.fingerprint(), big.key(), "float16")).exists()


def test_unknown_storage_dtype_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(OCLError, match="cache_dtype='bfloat16'"):
        extract_features(images(), Counting(), tmp_path, progress=False, dtype="bfloat16")


def test_entries_of_cache_format_1_stay_valid(tmp_path, caplog) -> None:
    ims, ex = images(), Counting()
    extract_features(ims, ex, tmp_path, progress=False)
    meta_path = entry_of(tmp_path, ims, ex) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 1  # what the earlier version wrote: the same layout, float32 only
    meta_path.write_text(json.dumps(meta))
    caplog.clear()  # the first extraction's INFO lines, captured when an earlier test left the loggers at INFO
    with caplog.at_level(logging.WARNING, logger="ocl.streams.cache"):
        extract_features(ims, ex, tmp_path, progress=False)
    assert ex.calls == 1 and not caplog.records
