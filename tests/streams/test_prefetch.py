"""Extraction into the cache's shards: a run extracts only what it streams, in stream order,
ahead of the learner; an interrupted extraction keeps its shards (ocl.streams.prefetch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.runner import run_stream
from ocl.streams.base import ArrayImageSet, Source
from ocl.streams.cache import cache_key
from ocl.streams.features import Extractor
from ocl.streams.prefetch import ExtractionInterrupted, extract_features, stream_features, stream_plan
from ocl.streams.protocols import split

K = 4


def indexed_images(n: int, seed: int = 0) -> ArrayImageSet:
    """Random images whose first two pixels' red values spell their index (i // 256, i % 256)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = np.arange(n) // 256, np.arange(n) % 256
    return ArrayImageSet(x, np.arange(n) % K)


def source(n_train: int = 200, n_test: int = 40) -> Source:
    return Source("fake", indexed_images(n_train), indexed_images(n_test, seed=1), [str(k) for k in range(K)])


class Recording(Extractor):
    """Exact, per-image features (channel means and the image's index): (n, H, W, C) -> (n, 4).
    Records the indices of the images it extracts, per batch; raises ``fail`` after
    ``fail_after`` batches."""

    feature_dim = 4

    def __init__(self, fail_after: int | None = None, fail: type[BaseException] = KeyboardInterrupt) -> None:
        self.batches: list[list[int]] = []
        self.fail_after, self.fail = fail_after, fail

    def key(self) -> str:
        return "recording/v1"

    @property
    def seen(self) -> list[int]:
        return [i for b in self.batches for i in b]

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise self.fail("stopped by the test")
        index = batch[:, 0, 0, 0].astype(np.int64) * 256 + batch[:, 0, 1, 0]
        self.batches.append(index.tolist())
        means = batch.astype(np.float32).mean(axis=(1, 2))  # (n, 3)
        return torch.from_numpy(np.concatenate([means, index[:, None].astype(np.float32)], axis=1))


def expected(ims: ArrayImageSet) -> np.ndarray:
    return Recording()(ims.data).numpy()


def lazy(src: Source, stream, ex: Extractor, cache, test: bool = True, batch_size: int = 16):
    splits = [("train", src.train)] + ([("test", src.test)] if test else [])
    return stream_features(splits, stream, ex, cache, progress=False, batch_size=batch_size)


def drain(feats: dict, prefetch) -> None:
    """Let the extraction finish, then stop it (as ocl run does)."""
    prefetch._thread.join(timeout=60)
    prefetch.close()


# --- what is extracted, and in which order ---------------------------------------------


def test_stream_plan_reads_the_test_images_at_the_first_boundary() -> None:
    plan = stream_plan(np.array([5, 3, 9, 1]), np.array([2]), np.array([7, 8]))
    assert [(s, i.tolist()) for s, i in plan] == [("train", [5, 3]), ("test", [7, 8]), ("train", [9, 1])]
    assert [s for s, _ in stream_plan(np.array([5, 3]), np.array([]), None)] == ["train"]


def test_a_run_extracts_exactly_its_stream_in_stream_order(tmp_path) -> None:
    src = source()
    stream = split(src, seed=0, n_tasks=2, max_examples=30)
    ex = Recording()
    feats, prefetch = lazy(src, stream, ex, tmp_path, test=False)
    prefetch._thread.join(timeout=60)
    prefetch.close()
    assert ex.seen == stream.order.tolist()  # nothing else, nothing twice, in the order the learner reads it
    assert all(len(b) <= 16 for b in ex.batches)
    np.testing.assert_array_equal(feats["train"][stream.order], expected(src.train)[stream.order])
    entry = tmp_path / cache_key(src.train.fingerprint(), ex.key())
    assert not (entry / "features.npy").exists()  # a partial entry: shards only
    assert len(list((entry / "rows").glob("*.json"))) == 2  # 30 images in batches of 16


def test_with_eval_test_the_test_images_come_at_the_first_boundary(tmp_path) -> None:
    src = source()
    stream = split(src, seed=0, n_tasks=2)
    ex = Recording()
    feats, prefetch = lazy(src, stream, ex, tmp_path)
    prefetch._thread.join(timeout=60)
    prefetch.close()
    cut = int(stream.boundaries()[0])
    test_idx = np.unique(np.concatenate([tt.index for tt in stream.tests]))
    seen = ex.seen
    assert seen[:cut] == stream.order[:cut].tolist()
    assert sorted(seen[cut:cut + test_idx.size]) == test_idx.tolist()
    assert seen[cut + test_idx.size:] == stream.order[cut:].tolist()


def test_a_longer_run_extracts_only_what_it_lacks_and_assembles_the_full_entry(tmp_path) -> None:
    src = source()
    short = split(src, seed=0, n_tasks=2, max_examples=50)
    drain(*lazy(src, short, Recording(), tmp_path, test=False))
    longer = split(src, seed=3, n_tasks=2)  # another protocol seed: another order, every image
    ex = Recording()
    feats, prefetch = lazy(src, longer, ex, tmp_path, test=False)
    prefetch._thread.join(timeout=60)
    prefetch.close()
    new = [i for i in longer.order.tolist() if i not in set(short.order.tolist())]
    assert ex.seen == new  # only the missing ones, in the new stream's order
    # every image is there now: the full entry, bit for bit what a whole-set extraction writes
    entry = tmp_path / cache_key(src.train.fingerprint(), ex.key())
    assert (entry / "meta.json").exists() and not (entry / "rows").exists()
    whole = extract_features(src.train, Recording(), tmp_path / "whole", progress=False)
    assembled = np.load(entry / "features.npy")
    assert assembled.tobytes() == np.asarray(whole).tobytes()
    meta = json.loads((entry / "meta.json").read_text())
    whole_meta = json.loads((tmp_path / "whole" / entry.name / "meta.json").read_text())
    assert meta["sha1"] == whole_meta["sha1"] and meta["shape"] == whole_meta["shape"]
    again = Recording()
    feats, prefetch = lazy(src, longer, again, tmp_path, test=False)
    assert prefetch is None and again.seen == [] and isinstance(feats["train"], np.memmap)  # a plain cache hit


def test_a_complete_entry_of_an_earlier_version_is_read_as_it_is(tmp_path) -> None:
    # what a whole-set extraction wrote before shards existed: features.npy + meta.json, nothing else
    src = source()
    whole = extract_features(src.train, Recording(), tmp_path, progress=False)
    entry = tmp_path / cache_key(src.train.fingerprint(), Recording().key())
    assert sorted(p.name for p in entry.iterdir()) == ["features.npy", "meta.json"]
    meta = json.loads((entry / "meta.json").read_text())
    for k in ("engine", "shards"):
        meta.pop(k)  # the fields an earlier version did not write
    (entry / "meta.json").write_text(json.dumps(meta))
    ex = Recording()
    feats, prefetch = lazy(src, split(src, seed=0, n_tasks=2, max_examples=20), ex, tmp_path, test=False)
    assert prefetch is None and ex.seen == []
    np.testing.assert_array_equal(feats["train"], whole)


# --- the learner sees the same stream ----------------------------------------------------


class Tape(Learner):
    """Records every input it is given (predict, update, evaluate); predicts uniformly."""

    name = "tape"

    def __init__(self) -> None:
        self.tape: list[tuple[str, bytes]] = []

    def predict(self, x):
        self.tape.append(("predict", x.numpy().tobytes()))
        return torch.full((x.shape[0], K), -np.log(K))

    def evaluate(self, x):
        self.tape.append(("evaluate", x.numpy().tobytes()))
        return torch.full((x.shape[0], K), -np.log(K))

    def update(self, x, y):
        self.tape.append(("update", x.numpy().tobytes() + y.numpy().tobytes()))


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_the_learner_sees_exactly_the_stream_it_sees_with_full_features(tmp_path, chunk_size) -> None:
    src = source()
    stream = split(src, seed=0, n_tasks=2, max_examples=120)
    feats, prefetch = lazy(src, stream, Recording(), tmp_path, batch_size=8)
    try:
        lazy_tape = Tape()
        res = run_stream(lazy_tape, feats["train"], stream, chunk_size, test_feats=feats["test"], progress=False)
    finally:
        prefetch.close()
    full_tape = Tape()
    ref = run_stream(full_tape, expected(src.train), stream, chunk_size, test_feats=expected(src.test), progress=False)
    assert lazy_tape.tape == full_tape.tape and len(lazy_tape.tape) > 2 * len(stream) // chunk_size
    np.testing.assert_array_equal(res.acc, ref.acc)


# --- failures and interruptions -----------------------------------------------------------


def test_an_interrupted_extraction_keeps_its_shards_and_the_rerun_continues(tmp_path) -> None:
    ims = indexed_images(100)
    with pytest.raises(ExtractionInterrupted, match=r"interrupted: 48 of 100 images are kept in 3 shards in .*rows; "
                                                    "run the same command again"):
        extract_features(ims, Recording(fail_after=3), tmp_path, batch_size=16, progress=False)
    ex = Recording()
    out = extract_features(ims, ex, tmp_path, batch_size=16, progress=False)
    assert ex.seen == list(range(48, 100))
    assert out.tobytes() == expected(ims).tobytes()


def test_a_failing_background_extraction_reaches_the_learner_and_keeps_its_shards(tmp_path) -> None:
    src = source()
    stream = split(src, seed=0, n_tasks=2, max_examples=64)
    feats, prefetch = lazy(src, stream, Recording(fail_after=2, fail=RuntimeError), tmp_path, test=False)
    try:
        np.testing.assert_array_equal(feats["train"][stream.order[:32]], expected(src.train)[stream.order[:32]])
        with pytest.raises(OCLError, match="feature extraction failed: RuntimeError: stopped by the test"):
            feats["train"][stream.order[32:33]]
    finally:
        prefetch.close()
    ex = Recording()
    drain(*lazy(src, stream, ex, tmp_path, test=False))
    assert ex.seen == stream.order[32:].tolist()


def test_closing_stops_the_extraction_and_keeps_what_it_finished(tmp_path) -> None:
    src = source()
    stream = split(src, seed=0, n_tasks=2)

    class Slow(Recording):
        def __call__(self, batch):
            time.sleep(0.05)
            return super().__call__(batch)

    ex = Slow()
    feats, prefetch = lazy(src, stream, ex, tmp_path, test=False, batch_size=8)
    feats["train"][stream.order[:8]]
    prefetch.close()  # a run stopped by Ctrl-C: the batch under way is finished and written, no more
    kept = len(ex.seen)
    assert 8 <= kept < len(stream)
    again = Recording()
    drain(*lazy(src, stream, again, tmp_path, test=False))
    assert again.seen == stream.order[kept:].tolist()


SLOW_BACKBONE = textwrap.dedent("""
    import time
    import numpy as np
    import torch
    from ocl.streams.features import Extractor

    class Slow(Extractor):
        feature_dim = 3

        def __init__(self, **kwargs):
            pass

        def key(self):
            return "slow/v1"

        def __call__(self, batch):
            time.sleep(0.3)
            return torch.from_numpy(batch.reshape(len(batch), -1)[:, :3].astype(np.float32))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ocl_extract_stopped_by_a_signal_says_what_it_kept(tmp_path, sig) -> None:
    (tmp_path / "slow_backbone.py").write_text(SLOW_BACKBONE)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-c", "from ocl.cli import main; main()", "extract", "stream=digits", "backbone=pixels",
           "backbone._target_=slow_backbone.Slow", f"cache_dir={cache}", "eval_test=false", "progress=false",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not list(cache.glob("*/rows/*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: " in err and "images are kept in" in err and "run the same command again" in err
    assert "Traceback" not in err


def test_the_extraction_thread_has_its_own_torch_threads_and_leaves_the_learners_alone(tmp_path) -> None:
    gate = threading.Event()

    class Threads(Recording):
        threads = 2  # what backbone.threads sets

        def __call__(self, batch):
            gate.wait(30)
            self.inside = torch.get_num_threads()
            return super().__call__(batch)

    src = source()
    before = torch.get_num_threads()
    try:
        ex = Threads()
        feats, prefetch = lazy(src, split(src, seed=0, n_tasks=2, max_examples=20), ex, tmp_path, test=False)
        time.sleep(0.3)  # the thread is up and has set its count ...
        torch.set_num_threads(1)  # ... when the learner sets its threads=1, as ocl run does
        gate.set()
        drain(feats, prefetch)
        assert ex.inside == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
