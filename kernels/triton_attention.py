"""Triton forward/backward kernels of the windowed attention (semantics: :mod:`.reference`).

Flash-attention style (online softmax, fp32 statistics, nothing of size T x (S+T) in
memory). One program handles BLOCK_M queries of one (stream, head) and walks

- the sink (a single key: it initialises the running max/sum, so every row is finite),
- the S ring-buffer slots **in storage order**, read in place through the cache's own
  strides (a view of the learner's ``(L, B, H, S, Dh)`` buffer works as is), with the
  slot's token position loaded from ``cache_pos`` for the ALiBi bias and the empty-slot /
  causal masks: slot order is irrelevant to a softmax, so the ring is never unrolled,
- the chunk's keys up to the block's diagonal, adding the label term while loading.

The backward recomputes probabilities from the saved log-sum-exp: one kernel for dQ (plus
per-block partial gradients of the sink, summed in PyTorch, so no atomics and a
deterministic result) and one for dK/dV of the chunk (the label gradients are the same
tensors, since k = k_x + k_label). Cached keys/values get no gradient (they are detached
by design).

Importing this module imports triton; set ``TRITON_INTERPRET=1`` *before* the import to
run the kernels on CPU (numpy interpreter, for tests only: slow).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from triton import knobs

#: True when these kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def _scores(q, kt, qpos, kpos, qlo, m_ok, n_ok, offs_m, offs_n, slope, scale,
            STRICT: tl.constexpr, DIAG_ONLY: tl.constexpr, HAS_QLO: tl.constexpr, DOT_PREC: tl.constexpr):
    """Masked, biased scores ``(BLOCK_M, BLOCK_N)`` of queries ``q`` against keys ``kt`` (transposed)."""
    s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
    dist = qpos[:, None] - kpos[None, :]  # int64 token distance
    ok = m_ok[:, None] & n_ok[None, :] & (dist >= STRICT)
    if DIAG_ONLY:
        ok = ok & (offs_m[:, None] == offs_n[None, :])
    if HAS_QLO:
        ok = ok & (kpos[None, :] >= qlo[:, None])
    return tl.where(ok, s - slope * dist.to(tl.float32), float("-inf"))


@triton.jit
def _load_rows(ptr, offs, stride, offs_d, row_ok, d_ok):
    return tl.load(ptr + offs[:, None] * stride + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _fwd_kernel(
    Q, K, V, KL, VL, KC, VC, CPOS, QPOS, QLO, SK, SV, SLOPES, O, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    sklb, sklh, sklt, svlb, svlh, svlt,
    skcb, skch, skcs, svcb, svch, svcs,
    H, T, S, Dh, scale,
    HAS_LABEL: tl.constexpr, STRICT: tl.constexpr, ISOLATED: tl.constexpr, HAS_QLO: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    dtype = Q.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < Dh  # head dim padded to a power of two; padded lanes load 0
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, m_ok, d_ok)
    qpos = tl.load(QPOS + b * T + offs_m, mask=m_ok, other=0)
    qlo = qpos
    if HAS_QLO:
        qlo = tl.load(QLO + b * T + offs_m, mask=m_ok, other=0)
    slope = tl.load(SLOPES + h).to(tl.float32)

    # The sink starts the online softmax: max = its score, sum = 1, acc = its value.
    sk = tl.load(SK + h * Dh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sv = tl.load(SV + h * Dh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    m_i = tl.sum(q.to(tl.float32) * sk[None, :], axis=1) * scale
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + sv[None, :]

    # The ring buffer, slot by slot in storage order (positions say where each slot is).
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        kpos = tl.load(CPOS + b * S + offs_n, mask=n_ok, other=-1)
        kc = _load_rows(KC + b * skcb + h * skch, offs_n, skcs, offs_d, n_ok, d_ok)
        vc = _load_rows(VC + b * svcb + h * svch, offs_n, svcs, offs_d, n_ok, d_ok)
        s = _scores(q, tl.trans(kc), qpos, kpos, qlo, m_ok, kpos >= 0, offs_m, offs_n, slope, scale,
                    STRICT, False, HAS_QLO, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), vc, input_precision=DOT_PREC)
        m_i = m_new

    # The chunk, up to the block's last query (positions increase along the chunk).
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        kpos = tl.load(QPOS + b * T + offs_n, mask=n_ok, other=0)
        kx = _load_rows(K + b * skb + h * skh, offs_n, skt, offs_d, n_ok, d_ok)
        vx = _load_rows(V + b * svb + h * svh, offs_n, svt, offs_d, n_ok, d_ok)
        if HAS_LABEL:  # label-as-KV: fused here instead of a separate add + copy
            kx = (kx + _load_rows(KL + b * sklb + h * sklh, offs_n, sklt, offs_d, n_ok, d_ok)).to(dtype)
            vx = (vx + _load_rows(VL + b * svlb + h * svlh, offs_n, svlt, offs_d, n_ok, d_ok)).to(dtype)
        s = _scores(q, tl.trans(kx), qpos, kpos, qlo, m_ok, n_ok, offs_m, offs_n, slope, scale,
                    STRICT, ISOLATED, HAS_QLO, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), vx, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptr = O + pid_bh * T * Dh + offs_m[:, None] * Dh + offs_d[None, :]
    tl.store(o_ptr, out.to(dtype), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, KL, VL, KC, VC, CPOS, QPOS, QLO, SK, SV, SLOPES, DO, LSE, DELTA, DQ, DSK, DSV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    sklb, sklh, sklt, svlb, svlh, svlt,
    skcb, skch, skcs, svcb, svch, svcs,
    H, T, S, Dh, scale,
    HAS_LABEL: tl.constexpr, STRICT: tl.constexpr, ISOLATED: tl.constexpr, HAS_QLO: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    dtype = Q.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < Dh
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, m_ok, d_ok)
    do = _load_rows(DO + pid_bh * T * Dh, offs_m, Dh, offs_d, m_ok, d_ok)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_ok, other=0.0)
    qpos = tl.load(QPOS + b * T + offs_m, mask=m_ok, other=0)
    qlo = qpos
    if HAS_QLO:
        qlo = tl.load(QLO + b * T + offs_m, mask=m_ok, other=0)
    slope = tl.load(SLOPES + h).to(tl.float32)

    # Sink: dS = P (dP - delta); its key/value gradients are summed over this block's rows.
    sk = tl.load(SK + h * Dh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sv = tl.load(SV + h * Dh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    qf = q.to(tl.float32)
    dof = do.to(tl.float32)
    p_sink = tl.where(m_ok, tl.exp(tl.sum(qf * sk[None, :], axis=1) * scale - lse), 0.0)
    ds_sink = p_sink * (tl.sum(dof * sv[None, :], axis=1) - delta)
    dq = ds_sink[:, None] * sk[None, :]
    part = (pid_bh * tl.num_programs(0) + pid_m) * Dh + offs_d
    tl.store(DSK + part, tl.sum(ds_sink[:, None] * qf, axis=0) * scale, mask=d_ok)
    tl.store(DSV + part, tl.sum(p_sink[:, None] * dof, axis=0), mask=d_ok)

    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        kpos = tl.load(CPOS + b * S + offs_n, mask=n_ok, other=-1)
        kc = _load_rows(KC + b * skcb + h * skch, offs_n, skcs, offs_d, n_ok, d_ok)
        vc = _load_rows(VC + b * svcb + h * svch, offs_n, svcs, offs_d, n_ok, d_ok)
        s = _scores(q, tl.trans(kc), qpos, kpos, qlo, m_ok, kpos >= 0, offs_m, offs_n, slope, scale,
                    STRICT, False, HAS_QLO, DOT_PREC)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(vc), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dtype), kc, input_precision=DOT_PREC)

    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        kpos = tl.load(QPOS + b * T + offs_n, mask=n_ok, other=0)
        kx = _load_rows(K + b * skb + h * skh, offs_n, skt, offs_d, n_ok, d_ok)
        vx = _load_rows(V + b * svb + h * svh, offs_n, svt, offs_d, n_ok, d_ok)
        if HAS_LABEL:
            kx = (kx + _load_rows(KL + b * sklb + h * sklh, offs_n, sklt, offs_d, n_ok, d_ok)).to(dtype)
            vx = (vx + _load_rows(VL + b * svlb + h * svlh, offs_n, svlt, offs_d, n_ok, d_ok)).to(dtype)
        s = _scores(q, tl.trans(kx), qpos, kpos, qlo, m_ok, n_ok, offs_m, offs_n, slope, scale,
                    STRICT, ISOLATED, HAS_QLO, DOT_PREC)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(vx), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dtype), kx, input_precision=DOT_PREC)

    dq_ptr = DQ + pid_bh * T * Dh + offs_m[:, None] * Dh + offs_d[None, :]
    tl.store(dq_ptr, (dq * scale).to(dtype), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, KL, VL, QPOS, QLO, SLOPES, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    sklb, sklh, sklt, svlb, svlh, svlt,
    H, T, Dh, scale,
    HAS_LABEL: tl.constexpr, STRICT: tl.constexpr, ISOLATED: tl.constexpr, HAS_QLO: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    dtype = Q.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    d_ok = offs_d < Dh
    kpos = tl.load(QPOS + b * T + offs_n, mask=n_ok, other=0)
    kx = _load_rows(K + b * skb + h * skh, offs_n, skt, offs_d, n_ok, d_ok)
    vx = _load_rows(V + b * svb + h * svh, offs_n, svt, offs_d, n_ok, d_ok)
    if HAS_LABEL:
        kx = (kx + _load_rows(KL + b * sklb + h * sklh, offs_n, sklt, offs_d, n_ok, d_ok)).to(dtype)
        vx = (vx + _load_rows(VL + b * svlb + h * svlh, offs_n, svlt, offs_d, n_ok, d_ok)).to(dtype)
    slope = tl.load(SLOPES + h).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Only queries at or after this key block can see it (causal chunk).
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, m_ok, d_ok)
        do = _load_rows(DO + pid_bh * T * Dh, offs_m, Dh, offs_d, m_ok, d_ok)
        lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_ok, other=0.0)
        qpos = tl.load(QPOS + b * T + offs_m, mask=m_ok, other=0)
        qlo = qpos
        if HAS_QLO:
            qlo = tl.load(QLO + b * T + offs_m, mask=m_ok, other=0)
        s = _scores(q, tl.trans(kx), qpos, kpos, qlo, m_ok, n_ok, offs_m, offs_n, slope, scale,
                    STRICT, ISOLATED, HAS_QLO, DOT_PREC)
        p = tl.exp(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p).to(dtype), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(vx), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(dtype), q, input_precision=DOT_PREC)

    out = pid_bh * T * Dh + offs_n[:, None] * Dh + offs_d[None, :]
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, (dk * scale).to(dtype), mask=mask)
    tl.store(DV + out, dv.to(dtype), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a ``(B, H, N, Dh)`` tensor with a unit last stride."""
    return x.stride(0), x.stride(1), x.stride(2)


def _blocks(T: int, Dh: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_stages). tl.dot needs every dim >= 16. fp32 tiles are
    twice the bytes: smaller tiles and shallower pipelines keep every kernel under ~80 KB of
    shared memory (checked by compiling for sm_80/sm_90 ahead of time; consumer GPUs allow
    ~99 KB). No GPU was available to tune these for speed."""
    block_d = max(16, triton.next_power_of_2(Dh))
    block_m = min(64, max(16, triton.next_power_of_2(T)))
    if dtype == torch.float32:
        block_n = 32
        if block_d >= 128:
            block_m = min(block_m, 32)
        stages = 2 if block_d <= 64 else 1
    else:
        block_n = 64 if block_d <= 64 else 32
        stages = 2
    return block_m, block_n, block_d, stages


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class WindowedAttentionFn(torch.autograd.Function):
    """Autograd wrapper around the kernels; see :func:`ocl.kernels.windowed_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, k_label, v_label, k_cache, v_cache, cache_pos, q_pos, sink_k, sink_v, slopes,
                strict: bool, isolated: bool, q_lo):
        B, H, T, Dh = q.shape
        S = k_cache.shape[2]
        dtype = q.dtype
        q, k, v = _unit_last(q), _unit_last(k.to(dtype)), _unit_last(v.to(dtype))
        has_label = k_label is not None
        kl = _unit_last(k_label.to(dtype)) if has_label else k
        vl = _unit_last(v_label.to(dtype)) if has_label else v
        kc, vc = _unit_last(k_cache.detach().to(dtype)), _unit_last(v_cache.detach().to(dtype))
        cache_pos, q_pos = cache_pos.contiguous(), q_pos.contiguous()
        qlo = q_lo.contiguous() if q_lo is not None else q_pos
        sk, sv = sink_k.contiguous(), sink_v.contiguous()
        slopes_c = slopes.to(torch.float32).contiguous()
        o = torch.empty(B, H, T, Dh, device=q.device, dtype=dtype)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        bm, bn, bd, stages = _blocks(T, Dh, dtype)
        scale = 1.0 / math.sqrt(Dh)
        flags = dict(HAS_LABEL=has_label, STRICT=1 if strict else 0, ISOLATED=isolated, HAS_QLO=q_lo is not None,
                     DOT_PREC="ieee" if dtype == torch.float32 else "tf32")
        strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(kl), *_strides3(vl))
        cstrides = (*_strides3(kc), *_strides3(vc))
        _fwd_kernel[(triton.cdiv(T, bm), B * H)](
            q, k, v, kl, vl, kc, vc, cache_pos, q_pos, qlo, sk, sv, slopes_c, o, lse,
            *strides, *cstrides, H, T, S, Dh, scale,
            **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=4, num_stages=stages,
        )
        ctx.save_for_backward(q, k, v, kl, vl, kc, vc, cache_pos, q_pos, qlo, sk, sv, slopes_c, o, lse)
        ctx.meta = (flags, scale, has_label, sink_k.dtype)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, kl, vl, kc, vc, cache_pos, q_pos, qlo, sk, sv, slopes_c, o, lse = ctx.saved_tensors
        flags, scale, has_label, sink_dtype = ctx.meta
        B, H, T, Dh = q.shape
        S = kc.shape[2]
        do = do.to(q.dtype).contiguous()
        delta = (o.float() * do.float()).sum(-1)  # (B, H, T): rowsum(dO * O)
        bm, bn, bd, stages = _blocks(T, Dh, q.dtype)
        n_m = triton.cdiv(T, bm)
        dq = torch.empty_like(o)
        dk = torch.empty_like(o)
        dv = torch.empty_like(o)
        dsk = torch.empty(B * H, n_m, Dh, device=q.device, dtype=torch.float32)
        dsv = torch.empty_like(dsk)
        strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(kl), *_strides3(vl))
        _bwd_dq_kernel[(n_m, B * H)](
            q, k, v, kl, vl, kc, vc, cache_pos, q_pos, qlo, sk, sv, slopes_c, do, lse, delta, dq, dsk, dsv,
            *strides, *_strides3(kc), *_strides3(vc), H, T, S, Dh, scale,
            **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=4, num_stages=stages,
        )
        # dK/dV: the key block is the outer loop; square tiles keep the causal start simple.
        _bwd_dkdv_kernel[(triton.cdiv(T, bm), B * H)](
            q, k, v, kl, vl, q_pos, qlo, slopes_c, do, lse, delta, dk, dv,
            *strides, H, T, Dh, scale,
            **flags, BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd, num_warps=4, num_stages=stages,
        )
        d_sink_k = dsk.view(B, H, n_m, Dh).sum((0, 2)).to(sink_dtype)
        d_sink_v = dsv.view(B, H, n_m, Dh).sum((0, 2)).to(sink_dtype)
        dkl, dvl = (dk, dv) if has_label else (None, None)
        return (dq, dk, dv, dkl, dvl, None, None, None, None, d_sink_k, d_sink_v, None, None, None, None)
