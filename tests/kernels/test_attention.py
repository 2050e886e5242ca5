"""Windowed attention kernels: Triton vs the PyTorch reference (outputs and gradients), the
SDPA/Flex paths, and the learner with ``attn=triton`` vs ``attn=torch``.

Without CUDA the Triton kernels run in triton's CPU interpreter (``TRITON_INTERPRET=1``, set
below before anything imports the kernels); sizes stay tiny because the interpreter is slow.
With CUDA the same grid runs compiled on the GPU, plus the ``gpu``-marked cases (bf16/fp16,
large windows).
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the (lazy) import of ocl.kernels.triton_attention
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ocl.errors import OCLError  # noqa: E402
from ocl.kernels import reference_attention, windowed_attention  # noqa: E402
from ocl.kernels.attention import _interpreting, check_backend  # noqa: E402
from ocl.learners.transformer import OnlineTransformer, TransformerConfig, TransformerLearner  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not CUDA and not _interpreting(), reason="triton interpreter not enabled")


def ring_state(B: int, S: int, ends: list[int]) -> torch.Tensor:
    """``cache_pos (B, S)`` of ring buffers whose streams wrote tokens 0..ends[b]-1 to slot p % S."""
    pos = torch.full((B, S), -1, dtype=torch.long)
    for b, end in enumerate(ends):
        for p in range(max(0, end - S), end):
            pos[b, p % S] = p
    return pos


def make_inputs(B, H, T, S, D, label=True, dtype=torch.float32, device=DEV, seed=0):
    """Random attention inputs; stream b has written ``ends[b]`` tokens: wrapped around the ring
    (b = 0), partially filled (b = 1), empty after a reset (b = 2), ..."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    q, k, v = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    k_label, v_label = (rnd(B, H, T, D), rnd(B, H, T, D)) if label else (None, None)
    k_cache, v_cache = rnd(B, H, S, D, grad=False), rnd(B, H, S, D, grad=False)
    ends = [(2 * S + 3, S // 2 + 1, 0, S + 1)[b % 4] for b in range(B)]
    cache_pos = ring_state(B, S, ends).to(device)
    q_pos = (torch.tensor(ends)[:, None] + torch.arange(T)).to(device)
    sink_k, sink_v = rnd(H, D), rnd(H, D)
    slopes = (2.0 ** (-8.0 * torch.arange(1, H + 1) / H)).to(device)
    return dict(q=q, k=k, v=v, k_label=k_label, v_label=v_label, k_cache=k_cache, v_cache=v_cache,
                cache_pos=cache_pos, q_pos=q_pos, sink_k=sink_k, sink_v=sink_v, slopes=slopes)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error relative to the reference's max magnitude (floored: with W = 0, C = 1 the
    only key is the sink and the q gradient is exactly 0)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-2)).item()


def check_against_reference(inp, strict, tol, backend="triton", **kw):
    """Outputs and gradients (q, k, v, label terms, sink) of ``backend`` vs the fp32 reference."""
    out = windowed_attention(**inp, strict=strict, backend=backend, **kw)
    ref_inp = {n: (t.detach().float().requires_grad_(t.requires_grad) if torch.is_tensor(t) and t.is_floating_point()
                   else t) for n, t in inp.items()}
    ref = reference_attention(**ref_inp, strict=strict, **kw)
    assert out.shape == ref.shape and out.dtype == inp["q"].dtype
    assert rel_err(out, ref) < tol, f"output rel err {rel_err(out, ref):.2e}"
    names = [n for n, t in inp.items() if torch.is_tensor(t) and t.requires_grad]
    assert "k_cache" not in names
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref.device)
    grads = torch.autograd.grad(out, [inp[n] for n in names], grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, [ref_inp[n] for n in names], grad_out)
    for n, g, rg in zip(names, grads, ref_grads):
        assert g.shape == rg.shape
        assert rel_err(g, rg) < tol, f"grad {n}: rel err {rel_err(g, rg):.2e}"


# B, H, C (chunk T), W (cache S), D, mode. kv = strict with label terms; ctx = causal, no label.
GRID = [
    (1, 1, 1, 0, 16, "kv"),  # C = 1 and W = 0: the sink and nothing else
    (2, 2, 1, 8, 16, "kv"),  # C = 1 per-example protocol, wrapped ring
    (2, 4, 8, 64, 32, "kv"),
    (3, 2, 5, 7, 12, "kv"),  # odd sizes, head dim padded to 16, empty stream (b = 2)
    (2, 3, 17, 33, 24, "ctx"),  # odd, context mode
    (2, 2, 4, 0, 16, "ctx"),  # W = 0 with a chunk
    (2, 1, 40, 16, 16, "kv"),  # chunk longer than the cache
    (1, 2, 70, 20, 8, "kv"),  # two query tiles (70 > 64), D = 8 < 16
    (4, 2, 3, 50, 48, "ctx"),  # D = 48 (not a power of 2), all four ring states
    (2, 2, 6, 130, 64, "kv"),  # several cache tiles, D = 64
]


def grid_id(case) -> str:
    B, H, C, W, D, mode = case
    return f"B{B}-H{H}-C{C}-W{W}-D{D}-{mode}"


@needs_triton
@pytest.mark.parametrize("case", GRID, ids=grid_id)
def test_triton_matches_reference(case):
    B, H, C, W, D, mode = case
    inp = make_inputs(B, H, C, W, D, label=mode == "kv")
    check_against_reference(inp, strict=mode == "kv", tol=1e-4)


@needs_triton
@pytest.mark.parametrize("mode", ["kv", "ctx"])
def test_triton_isolated_and_q_lo(mode):
    """Held-out evaluation (isolated) and a per-query lower bound, as the learner uses them."""
    inp = make_inputs(2, 2, 6, 9, 16, label=mode == "kv")
    inp["q_pos"] = inp["q_pos"][:, :1].expand(-1, 6).contiguous()  # isolated: every query at the same spot
    check_against_reference(inp, strict=mode == "kv", tol=1e-4, isolated=True)
    inp = make_inputs(2, 2, 6, 9, 16, label=mode == "kv", seed=3)
    q_lo = inp["q_pos"] - 4  # a 4-token band: cuts into the cache and into the chunk
    check_against_reference(inp, strict=mode == "kv", tol=1e-4, q_lo=q_lo)


@needs_triton
def test_triton_reads_strided_views_in_place():
    """q/k/v as views of one fused qkv projection and the cache as a row slice of the learner's
    (L, B, H, S, Dh) buffer: the kernel takes strides, no copies needed."""
    B, H, T, S, D, L = 2, 2, 5, 8, 16, 3
    inp = make_inputs(B, H, T, S, D)
    qkv = torch.randn(B, T, 3 * H * D, device=DEV, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    buf = torch.randn(L, B + 1, H + 1, S, D, device=DEV)  # an extra row and head: the views are strided
    inp.update(q=q, k=k, v=v, k_cache=buf[1][1:, 1:], v_cache=buf[2][:B, :H])
    cache_pos = ring_state(B + 1, S, [20, 3, 9]).to(DEV)
    inp.update(cache_pos=cache_pos[1:], q_pos=(torch.tensor([3, 9])[:, None] + torch.arange(T)).to(DEV))
    assert not q.is_contiguous() and not inp["k_cache"].is_contiguous()
    check_against_reference(inp, strict=True, tol=1e-4)


def test_sdpa_path_matches_reference():
    for mode in ("kv", "ctx"):
        inp = make_inputs(3, 2, 5, 7, 12, label=mode == "kv", device="cpu")
        check_against_reference(inp, strict=mode == "kv", tol=1e-5, backend="torch")


def test_the_models_shared_bias_gives_the_ops_own_result():
    """attn=torch: the model builds one bias per forward for all its layers
    (:meth:`OnlineTransformer.attention_mask`); the op with that bias computes exactly what it
    computes alone, and what the specification does."""
    for mode in ("kv", "context"):
        cfg = TransformerConfig(label_mode=mode, d_model=16, n_heads=2, window=8)
        model = OnlineTransformer(8, 3, cfg)
        B, H, T, S, D = 3, 2, 4, 8, 8
        inp = make_inputs(B, H, T, S, D, label=mode == "kv", device="cpu")
        inp["slopes"] = model.slopes
        with torch.no_grad():
            for isolated in (False, True):
                mask = model.attention_mask(inp["q_pos"], inp["cache_pos"], isolated=isolated)
                assert mask.backend == "torch" and mask.bias is not None
                shared = windowed_attention(**inp, strict=mode == "kv", isolated=isolated, backend="torch",
                                            bias=mask.bias)
                alone = windowed_attention(**inp, strict=mode == "kv", isolated=isolated, backend="torch")
                assert torch.equal(shared, alone)
                ref = reference_attention(**inp, strict=mode == "kv", isolated=isolated)
                assert rel_err(shared, ref) < 1e-5


def test_flex_forward_on_cpu_and_clear_error_for_backward():
    """FlexAttention: CPU forward only (eager, unfused); a CPU backward raises ValueError (the
    kernels are a library), which the learner turns into an OCLError at construction."""
    inp = make_inputs(2, 2, 5, 7, 16, device="cpu")
    with torch.no_grad():
        out = windowed_attention(**inp, strict=True, backend="flex")
        ref = reference_attention(**inp, strict=True)
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="flex"):
        windowed_attention(**inp, strict=True, backend="flex")
    with pytest.raises(OCLError, match="flex"):
        TransformerLearner(8, 3, attn="flex")
    with pytest.raises(OCLError, match="attn"):
        TransformerLearner(8, 3, attn="cuda")
    assert check_backend("auto", "cpu") == "torch"


@needs_triton
@pytest.mark.parametrize("mode", ["kv", "context"])
def test_learner_with_triton_predicts_like_torch(mode):
    """Same seed, same stream: attn=triton logs the same predictions as attn=torch (training,
    replay streams, wrapped ring, held-out evaluate)."""
    tiny = dict(d_model=16, n_layers=2, n_heads=2, window=3, replay_streams=2, lr=1e-2, warmup=0, label_mode=mode)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    logs = []
    for attn in ("torch", "triton"):
        learner = TransformerLearner(8, 3, seed=0, attn=attn, device=DEV, **tiny)
        out = []
        for s in range(0, 10, 2):
            out.append(learner.predict(x[s : s + 2]))
            learner.update(x[s : s + 2], y[s : s + 2])
        out.append(learner.evaluate(x[:3]))
        logs.append(torch.cat(out))
    torch.testing.assert_close(logs[1], logs[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ GPU only
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [(4, 4, 16, 512, 32, "kv"), (8, 8, 64, 1024, 64, "ctx"), (2, 4, 1, 4096, 128, "kv")],
                         ids=grid_id)
def test_triton_half_precision_large_windows(case, dtype):
    B, H, C, W, D, mode = case
    inp = make_inputs(B, H, C, W, D, label=mode == "kv", dtype=dtype)
    check_against_reference(inp, strict=mode == "kv", tol=3e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", [(8, 4, 64, 4096, 32, "kv"), (8, 4, 16, 1000, 96, "ctx")], ids=grid_id)
def test_triton_fp32_large_windows(case):
    B, H, C, W, D, mode = case
    check_against_reference(make_inputs(B, H, C, W, D, label=mode == "kv"), strict=mode == "kv", tol=1e-4)


@gpu
@needs_cuda
def test_flex_matches_reference_on_gpu():
    inp = make_inputs(2, 4, 16, 256, 32)
    check_against_reference(inp, strict=True, tol=1e-4, backend="flex")


# ------------------------------------------------- compiles for real GPUs (no GPU needed)
AOT_SCRIPT = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ocl.kernels import triton_attention as ta

cc, dtype, Dh, T = int(sys.argv[1]), getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ty = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
bm, bn, bd, stages = ta._blocks(T, Dh, dtype)
for fn, block_n in ((ta._fwd_kernel, bn), (ta._bwd_dq_kernel, bn), (ta._bwd_dkdv_kernel, bm)):
    consts = dict(HAS_LABEL=True, STRICT=1, ISOLATED=False, HAS_QLO=True, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_D=bd,
                  DOT_PREC="ieee" if ty == "fp32" else "tf32")
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("CPOS", "QPOS", "QLO"):
            sig[n] = "*i64"
        elif n in ("LSE", "DELTA", "DSK", "DSV", "SLOPES"):
            sig[n] = "*fp32"
        elif n == "scale":
            sig[n] = "fp32"
        elif n[0].isupper() and n not in ("H", "T", "S", "Dh"):
            sig[n] = "*" + ty
        else:
            sig[n] = "i32"
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=4, num_stages=stages))
    print(fn.__name__, k.metadata.shared)
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__import__("triton").__file__),
                                                    "backends", "nvidia", "bin", "ptxas")),
                    reason="triton's bundled ptxas is missing")
@pytest.mark.parametrize("cc,dtype,Dh,T", [(90, "float32", 32, 16), (80, "bfloat16", 32, 64)],
                         ids=["sm90-fp32-D32-C16", "sm80-bf16-D32-C64"])
def test_kernels_compile_for_gpus_ahead_of_time(cc, dtype, Dh, T):
    """The interpreter does not catch GPU compile errors (dot shapes, layouts, shared memory):
    compile all three kernels to cubin for a real architecture, without a GPU, in a process
    where TRITON_INTERPRET is off, and check each fits in 99 KB of shared memory (the
    smallest per-block limit of sm_80+ GPUs)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(cc), dtype, str(Dh), str(T)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = {line.split()[0]: int(line.split()[1]) for line in res.stdout.splitlines()}
    assert len(shared) == 3 and max(shared.values()) <= 99 * 1024, shared
