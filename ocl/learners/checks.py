"""The learner contract, as checks any learner can be put through (river's ``check_estimator``
is the model): ``tests/learners/test_contract.py`` runs every check on every shipped learner
config and on the README's example learner, so a new learner gets them by adding its config.

Each check takes a *factory*, called like the runner calls a learner config:
``factory(feature_dim=D, num_classes=K, seed=s)``, and raises ``AssertionError`` (or the
learner's own error) when the learner breaks the contract:

- :func:`check_log_probs`: ``predict`` and ``evaluate`` return ``(C, K)`` float32 finite
  log-probabilities whose rows log-sum-exp to 0;
- :func:`check_label_blind`: the prediction for a chunk never depends on the labels of that
  chunk or of any later one (the prequential protocol);
- :func:`check_same_seed`: the seed alone decides the run (whatever the global RNGs hold);
- :func:`check_resume`: a learner checkpointed mid-stream and loaded again (as ``resume=true``
  does, side files included) continues exactly like the one that was never stopped;
- :func:`check_evaluate_is_stateless`: ``evaluate`` changes nothing later predictions see;
- :func:`check_frozen`: a :meth:`~ocl.learners.base.Learner.frozen` copy evaluates as the
  learner did when it was made, however the learner learns on, and making it changes nothing;
- :func:`check_bad_inputs`: a chunk of the wrong shape, or labels out of range, raise
  :class:`~ocl.errors.OCLError`.

Run them all with :func:`check_learner`. Everything is small (a stream of 48 examples of
D = 8 features in K = 3 classes) and seeded.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ocl import checkpoint as ckpt
from ocl.errors import OCLError
from ocl.learners.base import Learner

Factory = Callable[..., Learner]

D, K, N = 8, 3, 48  # the streams of the checks: N examples, D features, K classes


def clusters(n: int = N, dim: int = D, classes: int = K, seed: int = 0, spread: float = 2.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: features ``(n, dim)`` float32 and labels ``(n,)`` int64 (class means
    ``spread`` standard deviations apart, seeded)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * spread
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g), y


def prequential(learner: Learner, x: torch.Tensor, y: torch.Tensor, chunk: int = 1, start: int = 0,
                end: int | None = None) -> torch.Tensor:
    """The runner's loop without the scoring: predict each chunk, then reveal its labels.
    Returns the log-probabilities ``(n, K)`` of the examples ``[start, end)``."""
    end = len(y) if end is None else end
    out = []
    for s in range(start, end, chunk):
        out.append(learner.predict(x[s : min(s + chunk, end)]))
        learner.update(x[s : min(s + chunk, end)], y[s : min(s + chunk, end)])
    return torch.cat(out)


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fresh(factory: Factory, seed: int = 0, global_seed: int = 0) -> Learner:
    """A learner built after seeding the global RNGs with ``global_seed`` (as the runner seeds them)."""
    _seed_globals(global_seed)
    return factory(feature_dim=D, num_classes=K, seed=seed)


def assert_log_probs(logp: torch.Tensor, rows: int | None = None, classes: int | None = None,
                     what: str = "predictions", atol: float = 1e-5) -> None:
    """``logp`` is a float32 ``(rows, classes)`` tensor of finite log-probabilities whose rows
    log-sum-exp to 0 (within ``atol``); ``None`` leaves a dimension unchecked."""
    assert isinstance(logp, torch.Tensor) and logp.dim() == 2, f"{what}: not a (C, K) tensor ({type(logp)})"
    assert rows is None or logp.shape[0] == rows, f"{what}: {logp.shape[0]} rows, expected {rows}"
    assert classes is None or logp.shape[1] == classes, f"{what}: {logp.shape[1]} classes, expected {classes}"
    assert logp.dtype == torch.float32, f"{what}: dtype {logp.dtype}, expected float32"
    assert bool(torch.isfinite(logp).all()), f"{what}: log-probabilities not finite"
    err = float(logp.double().logsumexp(1).abs().max()) if logp.shape[0] else 0.0
    assert err <= atol, f"{what}: rows do not log-sum-exp to 0 (off by {err:.2e})"


def check_log_probs(factory: Factory) -> None:
    """Finite, normalised ``(C, K)`` log-probabilities from ``predict`` (chunks of 1 and 4) and
    from ``evaluate``."""
    x, y = clusters()
    for chunk in (1, 4):
        learner = _fresh(factory)
        for s in range(0, N, chunk):
            assert_log_probs(learner.predict(x[s : s + chunk]), min(chunk, N - s), K, f"predict (chunk {chunk})")
            learner.update(x[s : s + chunk], y[s : s + chunk])
        assert_log_probs(learner.evaluate(x[:10]), 10, K, "evaluate")


def check_label_blind(factory: Factory) -> None:
    """Changing the labels from step t on never changes a prediction made before they were
    revealed: of the chunks that start at or before t (t inside a chunk included)."""
    x, y = clusters()
    for chunk, t in ((1, 20), (3, 22)):  # t = 22 lies inside the chunk [21, 24)
        other = y.clone()
        other[t:] = (y[t:] + 1) % K
        a = prequential(_fresh(factory), x, y, chunk)
        b = prequential(_fresh(factory), x, other, chunk)
        seen = (t // chunk + 1) * chunk  # the examples of the chunks that start at or before t
        assert torch.equal(a[:seen], b[:seen]), (
            f"chunk {chunk}: a prediction changed with labels revealed after it (from step {t} on)")


def check_same_seed(factory: Factory) -> None:
    """Two learners built with the same seed make the same predictions, whatever the global
    RNGs hold; (for learners with randomness) the seed is what they depend on."""
    x, y = clusters()
    a = prequential(_fresh(factory, seed=5, global_seed=1), x, y, 2)
    b = prequential(_fresh(factory, seed=5, global_seed=2), x, y, 2)
    assert torch.equal(a, b), "the same seed gave different predictions"


def check_resume(factory: Factory) -> None:
    """Checkpointed after half the stream (the learner pickled with :mod:`ocl.checkpoint`, its
    side files in its work directory, the global RNG states with it) and loaded from a copy of
    that directory, the learner predicts the rest exactly as the one that went on."""
    x, y = clusters()
    with tempfile.TemporaryDirectory(prefix="ocl-check-") as tmp:
        run, copy = Path(tmp) / "run", Path(tmp) / "copy"
        run.mkdir()
        learner = _fresh(factory)
        learner.set_workdir(run)
        prequential(learner, x, y, 2, end=N // 2)
        try:
            ckpt.save_atomic(run / ckpt.CHECKPOINT, {"format": ckpt.FORMAT, "learner": learner, "rng": ckpt.rng_state()})
        except Exception as e:  # noqa: BLE001  (whatever pickling raised: the learner cannot be checkpointed)
            raise AssertionError(f"the learner cannot be checkpointed: {type(e).__name__}: {e}") from e
        shutil.copytree(run, copy)
        rest = prequential(learner, x, y, 2, start=N // 2)
        saved = ckpt.load(copy / ckpt.CHECKPOINT)
        ckpt.set_rng_state(saved["rng"])
        resumed = prequential(saved["learner"], x, y, 2, start=N // 2)
    assert torch.equal(rest, resumed), "a learner loaded from a checkpoint predicted differently"


def check_evaluate_is_stateless(factory: Factory) -> None:
    """``evaluate`` in the middle of the stream changes no later prediction (nor the global RNGs
    the learner draws from)."""
    x, y = clusters()
    held_out, _ = clusters(12, seed=1)
    runs = []
    for evaluate in (True, False):
        learner = _fresh(factory)
        first = prequential(learner, x, y, 2, end=N // 2)
        if evaluate:
            learner.evaluate(held_out)
            learner.evaluate(x[N // 2 : N // 2 + 1])  # the next input itself, as near-future accuracy does
        runs.append(torch.cat([first, prequential(learner, x, y, 2, start=N // 2)]))
    assert torch.equal(*runs), "evaluate changed what the learner predicts afterwards"


def check_frozen(factory: Factory) -> None:
    """``frozen()`` mid-stream: the copy's ``evaluate`` stays what the learner's was then while the
    learner learns the rest of the stream, and the learner predicts that rest as one never copied
    (what the pooled learner's lagged held-out experts rely on)."""
    x, y = clusters()
    probe, _ = clusters(6, seed=1)
    with tempfile.TemporaryDirectory(prefix="ocl-check-") as tmp:
        runs = []
        for copied in (True, False):
            (Path(tmp) / str(copied)).mkdir()
            learner = _fresh(factory)
            learner.set_workdir(Path(tmp) / str(copied))
            prequential(learner, x, y, 2, end=N // 2)
            if copied:
                then = learner.evaluate(probe)
                snap = learner.frozen()
                assert torch.equal(snap.evaluate(probe), then), "a frozen() copy evaluates differently from its learner"
            runs.append(prequential(learner, x, y, 2, start=N // 2))
        assert torch.equal(snap.evaluate(probe), then), "a frozen() copy changed as its learner learned on"
    assert torch.equal(*runs), "frozen() changed what the learner predicts afterwards"


def check_bad_inputs(factory: Factory) -> None:
    """A chunk of the wrong shape, and labels out of range or of the wrong shape, raise
    :class:`OCLError` (before and after the learner has seen data)."""
    x, y = clusters()
    learner = _fresh(factory)
    for seen in (False, True):
        if seen:
            prequential(learner, x, y, 4, end=12)
        bad: list[tuple[str, Callable[[], Any]]] = [
            ("features of D + 1", lambda: learner.predict(torch.randn(2, D + 1))),
            ("a 1-d chunk", lambda: learner.predict(torch.randn(D))),
            ("a label K", lambda: learner.update(x[:2], torch.tensor([0, K]))),
            ("a label -1", lambda: learner.update(x[:2], torch.tensor([-1, 0]))),
            ("2 labels for 3 examples", lambda: learner.update(x[:3], y[:2])),
            ("features of D + 1 in update", lambda: learner.update(torch.randn(2, D + 1), y[:2])),
            ("features of D + 1 in evaluate", lambda: learner.evaluate(torch.randn(2, D + 1))),
        ]
        for what, call in bad:
            try:
                call()
            except OCLError:
                continue
            except Exception as e:  # noqa: BLE001  (the contract is about the kind of error)
                raise AssertionError(f"{what}: raised {type(e).__name__} ({e}), not OCLError") from e
            raise AssertionError(f"{what}: accepted without an error")


#: Every check of the contract, in the order :func:`check_learner` runs them.
CHECKS: tuple[Callable[[Factory], None], ...] = (check_log_probs, check_label_blind, check_same_seed, check_resume,
                                                 check_evaluate_is_stateless, check_frozen, check_bad_inputs)


def check_learner(factory: Factory) -> None:
    """Run every check of :data:`CHECKS` on learners built by ``factory`` (raises at the first
    broken one)."""
    for check in CHECKS:
        check(factory)
