"""Streaming ridge regression onto one-hot labels, exact after every chunk, with the ridge
strength chosen prequentially from a grid (RanPAC's read-out, :mod:`ocl.learners.ranpac`)."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch.linalg import solve_triangular

from ocl.errors import OCLError

log = logging.getLogger(__name__)


class StreamingRidge:
    """``W = (G + lam I)^-1 C`` with ``G = sum h h^T`` (M, M) and ``C = sum h onehot(y)^T`` (M, K)
    over every example learned so far: after any prefix of the stream, :meth:`logits` are those of
    batch ridge regression on that prefix (float64, to rounding).

    How, at O(M^2) per example. At a *refresh* the Gram matrix is eigendecomposed,
    ``G_0 = Q diag(e) Q^T``; the ``r`` rows learned since, ``Z = H Q`` (r, M) in that basis, enter
    through Woodbury's identity (``d = 1 / (e + lam)``, ``D = diag(d)``, ``C^ = Q^T C`` current)::

        h W = z D C^ - (z D Z^T) S^-1 (Z D C^),   z = h Q,   S = I_r + Z D Z^T

    kept as the inverse ``L^-1`` of the Cholesky factor of ``S`` (grown by one block per chunk;
    ``S >= I``, so ``||L^-1|| <= 1``: an explicit inverse is stable, and a matrix-vector product with
    a block of a preallocated buffer is ~50x faster than a triangular solve on it, which copies it)
    and ``T = L^-1 Z D C^`` (updated in place when labels arrive), so a prediction costs
    ``M^2 + r M + r^2`` and learning a row ``r M + r^2``; the ``(M, M)`` products of the rows are
    queued and added to ``G`` as one matrix product at the next refresh (as
    :class:`~ocl.learners.slda.SLDALearner` does). A refresh comes every ``refresh_every`` examples
    (an O(M^3) eigendecomposition: at M = 2048, one thread, ~1 s in float32, ~2.6 s in float64);
    until the first one, ``G_0 = 0``, ``Q = I``, and every row is a Woodbury row.

    ``precision_dtype`` is the dtype of the eigendecomposition, of ``Q`` and of ``Z``, i.e. of the
    O(M^2) and O(M^3) work; ``G``, ``C``, ``L``, ``T`` and every small product are float64. float64:
    equal to a direct float64 solve to ~1e-9; float32: about twice as fast, equal to it to the
    float32 rounding of ``G``'s eigendecomposition (relative error ~1e-7 times the condition number
    of ``G + lam I``).

    The ridge strength: at each refresh, every ``lam`` of the grid scores the rows learned since
    the previous choice with the model as it stood *before* them (block-wise prequential
    accuracy: only labels already revealed, never a test split), added up over the stream; the
    best total wins (ties: the current ``lam`` if it is one of them, else the nearest in the grid).
    The eigenbasis makes this cheap (``L r M K``).
    Before the first refresh, choices come after ``first_refresh`` examples, then after twice as
    many, ..., each from the eigendecomposition of the ``n x n`` kernel matrix ``H H^T`` of the rows
    so far (cheap: n < M; a changed ``lam`` rebuilds ``L^-1`` and ``T`` from it). Until the first
    choice, ``lambdas[initial]``.

    Args:
        dim: M, the feature size.
        num_classes: K.
        lambdas: the grid of ridge strengths (> 0).
        initial: index into ``lambdas`` of the strength used before the first choice.
        refresh_every: examples between refreshes (>= 1; the Woodbury buffers hold that many rows).
        first_refresh: examples before the first choice of ``lam`` (>= 1).
        precision_dtype: ``"float32"`` or ``"float64"`` (above).
    """

    def __init__(self, dim: int, num_classes: int, lambdas: Sequence[float], initial: int,
                 refresh_every: int, first_refresh: int = 64, precision_dtype: str = "float64") -> None:
        lam = torch.tensor([float(v) for v in lambdas], dtype=torch.float64)
        if lam.numel() == 0 or not bool((lam > 0).all()) or not 0 <= initial < lam.numel():
            raise OCLError(f"ridge: lambdas must be a non-empty list of values > 0 and initial an index into it; "
                           f"got {list(lambdas)}, {initial}.")
        if refresh_every < 1 or first_refresh < 1:
            raise OCLError(f"ridge: refresh_every and first_refresh must be >= 1; got {refresh_every}, {first_refresh}.")
        if precision_dtype not in ("float32", "float64"):
            raise OCLError(f"ridge: precision_dtype must be 'float32' or 'float64'; got {precision_dtype!r}.")
        self.dtype = dt = getattr(torch, precision_dtype)
        self.dim, self.num_classes = dim, num_classes
        self.lambdas, self.index = lam, initial
        self.hits = torch.zeros(lam.numel(), dtype=torch.float64)  # prequential correct answers per lambda
        self.refresh_every, self.first_refresh = refresh_every, first_refresh
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)  # G_0: rows up to the last refresh
        self.targets = torch.zeros(dim, num_classes, dtype=torch.float64)  # C: every row
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.n = self.n0 = 0  # examples learned; of them, before the last refresh
        # The eigenbasis of G_0 (Q = I, e = 0 before any refresh: no decomposition of zeros).
        self.basis = torch.eye(dim, dtype=dt)  # Q (M, M)
        self.eig = torch.zeros(dim, dtype=torch.float64)  # e (M,)
        self.rotated = torch.zeros(dim, num_classes, dtype=torch.float64)  # C^ = Q^T C
        self.rotated0 = self.rotated.clone()  # Q^T C_0 at the last refresh (scores the block for the grid)
        self.counts0 = self.counts.clone()
        # Rows since the last refresh: raw (float32, exact: queued for G), rotated Z, labels, L^-1, T.
        cap = self.refresh_every
        self._raw = torch.zeros(cap, dim)
        self._z = torch.zeros(cap, dim, dtype=dt)
        self._y = torch.zeros(cap, dtype=torch.int64)
        self._linv = torch.zeros(cap, cap, dtype=torch.float64)
        self._t = torch.zeros(cap, num_classes, dtype=torch.float64)
        self.r = 0
        self._mark, self._next = 0, first_refresh  # before the first refresh: the block being scored, next choice
        self._kept: tuple | None = None  # (h, z, L^-1 Z D z^T, version) of the last keep=True logits
        self._version = 0  # changes whenever the state _kept depends on changes

    @property
    def lam(self) -> float:
        """The ridge strength in use."""
        return float(self.lambdas[self.index])

    def _d(self) -> torch.Tensor:
        return 1.0 / (self.eig + self.lambdas[self.index])  # (M,)

    def _parts(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``z = h Q`` (C, M) and ``L^-1 Z D z^T`` (r, C) (None while no rows are pending)."""
        z = h.to(self.dtype) @ self.basis if self.n0 else h.to(self.dtype)  # Q = I until the first refresh
        if not self.r:
            return z, None
        r = self.r
        zdz = self._z[:r] @ (z * self._d().to(self.dtype)).T
        return z, self._linv[:r, :r] @ zdz.double()

    def logits(self, h: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """``(C, K)`` float64 ``h W`` for features ``h (C, M)`` (every class; unseen ones score 0).
        ``keep``: ``h`` is learned next: keep the work that :meth:`update` can reuse."""
        if not keep and h.shape[0] > 2 * self.num_classes:
            # a large batch (a test set): through the weights, M^2 K once instead of M^2 per row
            return (h.to(self.dtype) @ self.weights().to(self.dtype)).double()
        z, v = self._parts(h)
        out = (z.double() * self._d()) @ self.rotated
        if v is not None:
            out -= v.T @ self._t[: self.r]
        if keep:  # (not cleared otherwise: an evaluate between a predict and its update leaves it)
            self._kept = (h, z, v, self._version)
        return out

    def weights(self) -> torch.Tensor:
        """``(M, K)`` float64 ``W = (G + lam I)^-1 C`` (O(M^2 K): what large batches are scored with)."""
        d, r = self._d(), self.r
        inner = d[:, None] * self.rotated
        if r:
            z = self._z[:r].double()
            inner -= (d[:, None] * z.T) @ (self._linv[:r, :r].T @ self._t[:r])
        return self.basis.double() @ inner

    def update(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Learn rows ``h (C, M)`` float32 with labels ``y (C,)`` int64."""
        kept, self._kept = self._kept, None
        for s in range(0, h.shape[0], self.refresh_every):  # a chunk larger than the buffers: in pieces
            hb, yb = h[s : s + self.refresh_every], y[s : s + self.refresh_every]
            if self.r + hb.shape[0] > self.refresh_every:
                self.refresh()
            # the work logits(keep=True) did for exactly these rows, if nothing changed since
            ok = kept is not None and kept[0] is h and kept[3] == self._version and hb.shape[0] == h.shape[0]
            z, v = (kept[1], kept[2]) if ok else self._parts(hb)
            self._append(hb, z, v, yb)
            if self.r >= self.refresh_every:
                self.refresh()
            elif not self.n0 and self.r >= self._next:
                self._choose_early()

    def _append(self, h: torch.Tensor, z: torch.Tensor, v: torch.Tensor | None, y: torch.Tensor) -> None:
        """Grow the Woodbury block by the rows ``h`` (rotated ``z``; ``v = L^-1 Z D z^T``)."""
        r, c = self.r, h.shape[0]
        z64 = z.double()
        zd = z64 * self._d()
        s22 = zd @ z64.T
        s22.diagonal().add_(1.0)  # I_c + Z_n D Z_n^T
        if v is not None:
            s22 -= v.T @ v  # the Schur complement: >= I exactly
        l22, info = torch.linalg.cholesky_ex(s22)
        if int(info):
            if self.dtype == torch.float64:
                raise OCLError(f"ridge: the Woodbury system lost positive definiteness (lambda {self.lam:g}).")
            # float32 rounding, amplified by 1 / lam where G has no spread and lam is tiny: go on in float64
            log.warning("ridge: float32 too coarse at lambda %g; continuing in float64", self.lam)
            self.dtype = torch.float64
            self.basis, self._z = self.basis.double(), self._z.double()
            self._rebuild()
            return self._append(h, *self._parts(h), y)
        onehot = torch.zeros(c, self.num_classes, dtype=torch.float64)
        onehot[torch.arange(c), y] = 1.0
        if v is not None:
            self._t[:r] += v @ onehot  # the old rows' Z D C^ gains Z D z^T onehot
        self.rotated += z64.T @ onehot
        self.targets += h.double().T @ onehot
        self.counts += onehot.sum(0)
        b = zd @ self.rotated  # the new rows' Z D C^, C^ already current
        if v is not None:
            b -= v.T @ self._t[:r]
        l22inv = solve_triangular(l22, torch.eye(c, dtype=torch.float64), upper=False)
        if v is not None:  # the new block row of L^-1: [-L22^-1 L21 L11^-1, L22^-1] with L21 = v^T
            self._linv[r : r + c, :r] = -l22inv @ (self._linv[:r, :r].T @ v).T  # (L^-T v)^T: 2x faster than v^T L^-1 here
        self._linv[r : r + c, r : r + c] = l22inv
        self._linv[:r, r : r + c] = 0.0  # (a rebuilt L^-1 is dense: the buffer may hold old values there)
        self._t[r : r + c] = l22inv @ b
        self._raw[r : r + c], self._z[r : r + c], self._y[r : r + c] = h, z, y
        self.r += c
        self.n += c
        self._version += 1

    def _vote(self, scores: torch.Tensor, y: torch.Tensor, seen: torch.Tensor) -> None:
        """Add each lambda's right answers (``scores (L, b, K_seen)`` of a block with labels ``y (b,)``,
        ``seen``: the classes the scoring model knew) and choose the best total."""
        truth = (torch.cumsum(seen, 0) - 1)[y]
        self.hits += ((scores.argmax(2) == truth) & seen[y]).sum(1).double()
        best = torch.nonzero(self.hits == self.hits.max()).flatten()
        # ties (early, all of a coarse grid often are): the current lambda if it is one of them, else the nearest
        self.index = int(best[(best - self.index).abs().argmin()])

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(y, self.num_classes).double()

    def _kernel_vote(self) -> None:
        """Before the first refresh (``G_0 = 0``): score rows ``[mark, r)`` with ridge on rows
        ``[0, mark)`` for every lambda, in kernel form ``h H^T (H H^T + lam I)^-1 Y``."""
        a, b = self._mark, self.r
        seen = torch.bincount(self._y[:a], minlength=self.num_classes) > 0
        if a and b > a:
            h = self._raw[:a].double()
            e, v = torch.linalg.eigh(h @ h.T)
            near = (self._raw[a:b].double() @ h.T) @ v  # (b - a, a)
            scores = (near[None] / (e.clamp_min(0.0)[None, None] + self.lambdas[:, None, None])) @ (
                v.T @ self._onehot(self._y[:a])[:, seen])
            self._vote(scores, self._y[a:b], seen)
        self._mark = b

    def _choose_early(self) -> None:
        """A choice of lambda before the first refresh; if it changed, rebuild ``L^-1`` and ``T``:
        with ``Q = I``, ``S = I + H H^T / lam = V (I + E / lam) V^T``, so ``L^-1 = (I + E / lam)^-1/2 V^T``."""
        before = self.index
        self._kernel_vote()
        self._next = 2 * self.r
        if self.index != before:
            self._rebuild()

    def _rebuild(self) -> None:
        """``L^-1`` and ``T`` of the pending rows from scratch, in float64: ``S = I + Z D Z^T =
        V E V^T``, ``L^-1 = E^-1/2 V^T`` (any factor with ``L L^T = S`` serves: blocks grow on it)."""
        r = self.r
        z = self._z[:r].double()
        zd = z * self._d()
        s = zd @ z.T
        s.diagonal().add_(1.0)
        e, v = torch.linalg.eigh(s)
        linv = e.clamp_min(1.0).rsqrt()[:, None] * v.T  # S >= I
        self._linv[:r, :r] = linv
        self._t[:r] = linv @ (zd @ self.rotated)
        self._version += 1

    def refresh(self) -> None:
        """Score the pending rows for the grid, fold them into ``G``, eigendecompose it."""
        r = self.r
        if not r:
            return
        seen = self.counts0 > 0
        if not self.n0:
            self._kernel_vote()
        elif bool(seen.any()):  # the model at the block's start had classes to score: a vote for each lambda
            d = 1.0 / (self.eig[None, :] + self.lambdas[:, None])  # (L, M)
            scores = self._z[:r].double() @ (d[:, :, None] * self.rotated0[None, :, seen])  # (L, r, K_seen)
            self._vote(scores, self._y[:r], seen)
        raw = self._raw[:r].double()
        self.gram.addmm_(raw.T, raw)
        eig, basis = torch.linalg.eigh(self.gram.to(self.dtype))
        self.eig, self.basis = eig.double().clamp_min(0.0), basis  # G is PSD: negative eigenvalues are rounding
        self.rotated = basis.double().T @ self.targets
        self.rotated0, self.counts0 = self.rotated.clone(), self.counts.clone()
        self.n0, self.r = self.n, 0
        self._version += 1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        r = self.r  # only the filled part of the buffers (a full one is ~4 M^2 doubles)
        state["_raw"], state["_z"], state["_y"] = self._raw[:r].clone(), self._z[:r].clone(), self._y[:r].clone()
        state["_linv"], state["_t"] = self._linv[:r, :r].clone(), self._t[:r].clone()
        state["_kept"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        cap = self.refresh_every
        for name, shape in (("_raw", (cap, self.dim)), ("_z", (cap, self.dim)), ("_y", (cap,)),
                            ("_linv", (cap, cap)), ("_t", (cap, self.num_classes))):
            part = state[name]
            full = torch.zeros(shape, dtype=part.dtype)
            full[tuple(slice(0, n) for n in part.shape)] = part
            setattr(self, name, full)


def log_grid(lo: int, hi: int) -> list[float]:
    """``[10^lo, 10^(lo+1), ..., 10^hi]``."""
    return [math.pow(10.0, p) for p in range(lo, hi + 1)]
