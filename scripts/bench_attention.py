"""Windowed attention backends, and the transformer learner's examples/s with each (issue 5).

Two tables, every figure from one run on one machine (the device is printed first):

1. ``kernel``: one attention call of the learner's shape (B = R replay streams, H heads,
   Dh, label-as-KV mode with the label term) for W in ``--windows`` and C in ``--chunks``:
   the Triton kernel, PyTorch SDPA with an explicit additive mask (concatenated
   [sink, cache, chunk] keys: the ``torch`` backend), and FlexAttention (concatenated keys,
   ``score_mod`` + block mask; the block mask is rebuilt per call, as the learner must: the
   cache positions change every step). Forward and forward+backward, in ms, and the ratios
   to the Triton kernel.
2. ``learner``: examples/s of the predict+update loop with each backend on synthetic
   features (the learner's defaults otherwise), for every chunk size C in ``--learner-chunks``
   and segment G in ``--learner-segments`` (a gradient step every G examples; G < C is
   skipped but G = 1, a step per chunk); ``--cuda-graph`` adds each backend with
   ``learner.cuda_graph=true`` (predict and the training step replayed as CUDA graphs),
   ``--compile`` each with the compiled network (and compiled + captured).

On CPU (no GPU lent): the Triton kernel only runs in triton's numpy interpreter, which is
not a speed measure, so its columns are skipped ("-") and the ratios are to SDPA instead;
FlexAttention has no CPU backward (forward only, eager/unfused) and the learner cannot
train with it, so the learner table has the torch backend only (``--compile`` adds the
torch.compile'd network: ~45 s of compiling first).

Examples::

    .venv/bin/python scripts/bench_attention.py                 # both tables, 1 thread
    .venv/bin/python scripts/bench_attention.py kernel --windows 64 1024 --chunks 16
    .venv/bin/python scripts/bench_attention.py learner --compile
    # the GPU figures: every backend, eager and captured, C and G = 1, 8, 32, W = 64, D = 1280
    .venv/bin/python scripts/bench_attention.py learner --device cuda --cuda-graph --examples 2000 \
        --features 1280 --learner-windows 64 --learner-chunks 1 8 32 --learner-segments 1 8 32
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from ocl.kernels import windowed_attention
from ocl.kernels.attention import triton_available
from ocl.learners.transformer import TransformerConfig, TransformerLearner, alibi_slopes
from ocl.report import format_table

log = logging.getLogger("bench_attention")


def timeit(fn, device: torch.device, budget: float = 0.25, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median seconds of ``fn()`` after one warm-up call, repeating for about ``budget`` seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def attention_inputs(B: int, H: int, C: int, W: int, Dh: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The learner's attention inputs mid-stream: a full, wrapped ring (positions t-W..t-1)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=True):
        return (torch.randn(*shape, generator=g) * 0.5).to(device, dtype).requires_grad_(grad)

    t = 3 * W + 7  # the ring has wrapped: slot p % W holds position p
    slots = torch.arange(t - W, t) % max(W, 1)
    cache_pos = torch.empty(W, dtype=torch.long)
    cache_pos[slots] = torch.arange(t - W, t)
    return dict(
        q=rnd(B, H, C, Dh), k=rnd(B, H, C, Dh), v=rnd(B, H, C, Dh), k_label=rnd(B, H, C, Dh), v_label=rnd(B, H, C, Dh),
        k_cache=rnd(B, H, W, Dh, grad=False), v_cache=rnd(B, H, W, Dh, grad=False),
        cache_pos=cache_pos.expand(B, W).to(device).contiguous(),
        q_pos=(t + torch.arange(C)).expand(B, C).to(device).contiguous(),
        sink_k=rnd(H, Dh), sink_v=rnd(H, Dh), slopes=alibi_slopes(H).to(device), strict=True,
    )


def kernel_table(args, device: torch.device) -> str:
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    run_triton = cuda and triton_available()
    names = ["triton", "torch", "flex"] if run_triton else ["torch", "flex"]
    base = names[0]  # ratios are to the Triton kernel, or to SDPA where it cannot be timed
    others = names[1:]
    rows = []
    for W in args.windows:
        for C in args.chunks:
            inp = attention_inputs(args.streams, args.heads, C, W, args.head_dim, device, dtype)
            grad_out = torch.randn(args.streams, args.heads, C, args.head_dim, device=device, dtype=dtype)

            def fwd(backend):
                with torch.no_grad():
                    return windowed_attention(**inp, backend=backend)

            def fwd_bwd(backend):
                out = windowed_attention(**inp, backend=backend)
                out.backward(grad_out)

            t = {}
            for name in names:
                t[name, "fwd"] = timeit(lambda: fwd(name), device, args.budget)
                if name != "flex" or cuda:  # no FlexAttention backward on CPU
                    t[name, "bwd"] = timeit(lambda: fwd_bwd(name), device, args.budget)
            row = [W, C]
            for name in names:
                row += [f"{1e3 * t[name, kind]:.3f}" if (name, kind) in t else "-" for kind in ("fwd", "bwd")]
            for name in others:
                row += [f"{t[name, kind] / t[base, kind]:.2f}x" if (name, kind) in t else "-" for kind in ("fwd", "bwd")]
            rows.append(row)
            log.info("W=%d C=%d done", W, C)
    label = {"triton": "triton", "torch": "sdpa", "flex": "flex"}
    headers = ["W", "C"]
    for name in names:
        headers += [f"{label[name]} fwd ms", f"{label[name]} f+b ms"]
    for name in others:
        headers += [f"{label[name]}/{label[base]} fwd", f"{label[name]}/{label[base]} f+b"]
    return format_table(rows, headers)


def learner_table(args, device: torch.device) -> str:
    cuda = device.type == "cuda"
    backends = ["torch"] + (["triton", "flex"] if cuda and triton_available() else ["flex"] if cuda else [])
    variants = [(b, False, False) for b in backends] + ([(b, True, False) for b in backends] if args.compile else [])
    if args.cuda_graph and cuda:  # captured steps, and captured + compiled (fused kernels, one launch)
        variants += [(b, False, True) for b in backends] + ([(b, True, True) for b in backends] if args.compile else [])
    g = torch.Generator().manual_seed(0)
    rows = []
    for W in args.learner_windows:
        for C, G in [(C, G) for C in args.learner_chunks for G in args.learner_segments if G == 1 or G >= C]:
            n = args.examples * max(1, C // 4, G // 4)  # bigger chunks/segments are cheaper per example: more
            x = torch.randn(n, args.features, generator=g)
            y = torch.randint(0, 10, (n,), generator=g)
            for backend, compiled, graphed in variants:
                name = backend + (" +compile" if compiled else "") + (" +graph" if graphed else "")
                try:
                    learner = TransformerLearner(args.features, 10, seed=0, window=W, attn=backend, compile=compiled,
                                                 cuda_graph=graphed, device=device.type, segment=G)
                    warm = max(C, n // 4)  # fills the ring, starts replay, compiles and captures if asked

                    def run(a, b):
                        for s in range(a, b, C):
                            learner.predict(x[s : s + C])
                            learner.update(x[s : s + C], y[s : s + C])

                    t0 = time.perf_counter()
                    run(0, warm)
                    t1 = time.perf_counter()
                    run(warm, n)
                    if cuda:
                        torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    rows.append([name, W, C, G, f"{(n - warm) / (t2 - t1):.1f}", f"{t1 - t0:.1f}"])
                except Exception as e:  # one variant that cannot run must not cost the others' figures
                    log.exception("learner %s W=%d C=%d G=%d failed", name, W, C, G)
                    rows.append([name, W, C, G, f"failed: {type(e).__name__}", "-"])
                log.info("learner %s W=%d C=%d G=%d done", name, W, C, G)
    return format_table(rows, ["backend", "W", "C", "G", "examples/s", "warm-up s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", nargs="?", default="both", choices=["kernel", "learner", "both"])
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--windows", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--streams", type=int, default=8, help="B: streams per attention call (the learner's R; default 8)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32, help="Dh (learner default d_model 128 / 4 heads)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--budget", type=float, default=0.25, help="seconds of repeats per measurement")
    p.add_argument("--learner-windows", type=int, nargs="+", default=[64, 512])
    p.add_argument("--learner-chunks", type=int, nargs="+", default=[1, 16])
    p.add_argument("--learner-segments", type=int, nargs="+", default=[1, 8],
                   help="segments G: a gradient step every G examples")
    p.add_argument("--examples", type=int, default=300, help="examples per learner run (x C/4 for C > 4)")
    p.add_argument("--features", type=int, default=384, help="feature dim D (DINO ViT-S width)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd network")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: also time learner.cuda_graph=true (captured steps)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"device: {name}; torch {torch.__version__}; B={args.streams} H={args.heads} Dh={args.head_dim} "
          f"{args.dtype}; kv mode with label terms")
    if device.type != "cuda":
        print("no GPU: triton columns skipped (the CPU interpreter is not a speed measure); ratios are to SDPA; "
              "FlexAttention has no CPU backward (forward only, eager = unfused)")
    if args.part in ("kernel", "both"):
        print("\nattention call (median ms)\n" + kernel_table(args, device))
    if args.part in ("learner", "both"):
        c = TransformerConfig()
        print(f"\nlearner predict+update loop (defaults: d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads, "
              f"R {c.replay_streams})\n"
              + learner_table(args, device))


if __name__ == "__main__":
    main()
