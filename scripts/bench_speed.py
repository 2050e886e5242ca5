"""Transformer learner speed (or another learner's: ``--learner``), this checkout against another git ref,
side by side in one run (issue 14).

A noisy, shared machine makes speed figures from different runs incomparable, so this
script measures both implementations in the same run, in lock step: for every (D, C) it
starts one worker subprocess per implementation; each builds the learner with its defaults
(kv mode, d=128, 2 layers, 4 heads, W=64, R=8, temperature on) plus any ``--option`` and
fills the window on the same seeded synthetic stream. Then the two take turns, ``--block``
steps of predict + update at a time (``--threads`` torch threads; the order flips every
block), until each has done ``--steps``: both see the same load on the machine. It prints
the examples/s of each, their ratio, and the mean log-loss of the timed examples (equal up
to float rounding when the two compute the same thing; on random labels training is
chaotic enough that rounding differences can grow over long runs). ``--profile`` adds
each implementation's top ops (torch.profiler, self CPU time and calls) after the timing;
``--phases`` the milliseconds per step spent in the learner's main methods (network forward,
backward, AdamW, the read-outs, ...); ``--floor`` the current step's AdamW and matrix products
timed alone (what no implementation of the same step avoids).

The baseline is exported with ``git archive REF`` into a temporary directory. Each
subprocess imports ``ocl`` from a staged package tree that mirrors the ``package-dir``
mapping of that tree's ``pyproject.toml`` (``ocl.streams`` -> ``streams/``, ...) with
symbolic links, ahead of the editable install on ``sys.path``; the subprocess checks that
``ocl`` really came from there. "current" is this working tree as it is on disk
(uncommitted changes included).

Examples::

    .venv/bin/python scripts/bench_speed.py --baseline f1a4e19
    .venv/bin/python scripts/bench_speed.py --baseline main --dims 384 --chunks 1 --reps 5
    .venv/bin/python scripts/bench_speed.py --baseline main --option window=256   # any learner option
    .venv/bin/python scripts/bench_speed.py --baseline f1a4e19 --dims 384 --chunks 1 --profile 50  # + top ops
    .venv/bin/python scripts/bench_speed.py --baseline main --phases 200   # + ms per step by method
    .venv/bin/python scripts/bench_speed.py --baseline main --floor 500    # + its AdamW and matmuls alone
    .venv/bin/python scripts/bench_speed.py --baseline a6c7c83 --learner ocl.learners.linear.LinearLearner \
        --steps 3000 --block 200   # another learner (its defaults; --option as for the transformer)
    .venv/bin/python scripts/bench_speed.py --baseline HEAD --learner ocl.learners.ranpac.RanPACLearner \
        --baseline-learner ocl.learners.slda.SLDALearner --steps 3000 --block 200   # two learners side by side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]



# ------------------------------------------------------------------ staging the two trees
def export_ref(ref: str, dest: Path) -> Path:
    """The files of git ``ref`` of this repository, extracted under ``dest``."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def stage_package(src: Path, dest: Path) -> Path:
    """A directory to put first on ``sys.path`` so that ``import ocl`` loads the sources of ``src``.

    The repository maps packages to folders (``ocl.streams`` -> ``streams/``: the
    ``package-dir`` table of its pyproject.toml); an import from the bare tree would miss
    them. The staged ``ocl/`` holds symbolic links to every entry of ``src/ocl`` plus one per
    mapped subpackage that lives elsewhere.
    """
    mapping = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    root = dest / "ocl"
    root.mkdir(parents=True)
    for entry in (src / mapping["ocl"]).iterdir():
        if entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry)
    for name, folder in sorted(mapping.items()):
        parts = name.split(".")
        if parts[0] != "ocl" or len(parts) != 2:
            continue  # "ocl" itself; deeper packages come with their parent folder
        link = root / parts[1]
        if not link.exists():
            link.symlink_to(src / folder)
        elif link.resolve() != (src / folder).resolve():
            raise SystemExit(f"{src}: package {name} maps to {folder}, but {link} is something else")
    return dest


# ------------------------------------------------------------------ the worker (a subprocess)
def worker(args: argparse.Namespace) -> None:
    """Import ``ocl`` from ``--stage``, build the learner, warm it up, then serve ``run N``
    requests on stdin: N more steps of the stream, answered with one JSON line of timings."""
    sys.path.insert(0, args.stage)
    import torch
    import yaml

    import importlib

    import ocl.kernels

    for mod in (ocl, ocl.kernels):  # the staged tree, not the editable install
        if Path(args.stage) not in Path(mod.__file__).parents:
            raise SystemExit(f"{mod.__name__} was imported from {mod.__file__}, not from {args.stage}")
    torch.set_num_threads(args.threads)
    D, C, K = args.dim, args.chunk, 10
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    module, _, cls = args.learner.rpartition(".")
    learner = getattr(importlib.import_module(module), cls)(D, K, seed=0, **options)
    window = learner.cfg.window if hasattr(learner, "cfg") else 38
    warm = (2 * window + 24) // C * C  # the transformer's ring is full and replay under way before timing
    n = warm + args.steps * C
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, D, generator=g), torch.randint(0, K, (n,), generator=g)

    def run(a: int, b: int) -> float:
        nll = 0.0
        for s in range(a, b, C):
            logp = learner.predict(x[s : s + C])
            nll -= float(logp[torch.arange(C), y[s : s + C]].sum())
            learner.update(x[s : s + C], y[s : s + C])
        return nll

    run(0, warm)
    at = warm
    print("ready", flush=True)
    for line in sys.stdin:
        command, steps = line.split()[0], int(line.split()[1])
        if command == "phases":  # where the time of `steps` more steps goes, by method (see PHASES)
            extra = torch.randn(steps * C, D, generator=g), torch.randint(0, K, (steps * C,), generator=g)
            print(json.dumps(phase_times(learner, extra, C, steps)), flush=True)
            continue
        if command == "floor":  # the step's unavoidable kernels, timed alone (see kernel_floor)
            print(json.dumps(kernel_floor(learner, C, steps)), flush=True)
            continue
        if command == "profile":  # the ops of `steps` more steps (on the examples after the timed ones)
            from torch.profiler import ProfilerActivity, profile

            extra = torch.randn(steps * C, D, generator=g), torch.randint(0, K, (steps * C,), generator=g)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for s in range(0, steps * C, C):
                    learner.predict(extra[0][s : s + C])
                    learner.update(extra[0][s : s + C], extra[1][s : s + C])
            top = [e for e in prof.events() if e.name.startswith("aten::") and (
                e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows,
                                              max_name_column_width=60)
            print(json.dumps({"aten_calls_per_step": len(top) / steps, "table": table}), flush=True)
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        nll = run(at, at + steps * C)
        print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "nll": nll,
                          "examples": steps * C}), flush=True)
        at += steps * C


#: --phases: the methods timed (inclusive: a method's time contains that of the methods it calls), as
#: (module, class, method); those a tree lacks (an older baseline) are left out of its column.
PHASES = [
    ("ocl.learners.transformer.learner", "TransformerLearner", "predict"),
    ("ocl.learners.transformer.learner", "TransformerLearner", "update"),
    ("ocl.learners.transformer.learner", "TransformerLearner", "_forward"),
    ("torch", "Tensor", "backward"),
    ("ocl.learners.transformer.flat_adamw", "FlatAdamW", "step"),
    ("ocl.learners.transformer.flat_adamw", "FlatAdamW", "zero_grad"),
    ("ocl.learners.transformer.readouts", "ReadOuts", "experts"),
    ("ocl.learners.transformer.readouts", "ReadOuts", "update"),
    ("ocl.learners.slda", "SLDALearner", "predict"),
    ("ocl.learners.slda", "SLDALearner", "update"),
    ("ocl.learners.linear", "LinearLearner", "predict"),
    ("ocl.learners.linear", "LinearLearner", "update"),
    ("ocl.learners.transformer.readouts", "Temperature", "step"),
    ("ocl.learners.pooled.learner", "PooledLearner", "predict"),  # --learner ocl.learners.pooled.PooledLearner
    ("ocl.learners.pooled.learner", "PooledLearner", "update"),
    ("ocl.learners.pooled.heldout", "HeldOutPool", "update"),
    ("ocl.learners.common", "Temperature", "step"),
    ("ocl.learners.transformer.learner", "TransformerLearner", "_batch"),
    ("ocl.learners.transformer.learner", "TransformerLearner", "_finish"),
]


def phase_times(learner, extra, C: int, steps: int) -> dict[str, float]:
    """Milliseconds per step spent in each of :data:`PHASES` over ``steps`` steps of ``extra``
    (examples, labels), and in all (``"step"``): each method is wrapped in a timer for the run."""
    import functools
    import importlib

    totals: dict[str, float] = {}
    undo = []
    for module, cls_name, meth in PHASES:
        try:
            cls = getattr(importlib.import_module(module), cls_name)
            f = getattr(cls, meth)
        except (ImportError, AttributeError):
            continue
        name = f"{cls_name}.{meth}"
        totals[name] = 0.0

        def timed(*a, _f=f, _name=name, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                totals[_name] += time.perf_counter() - t

        setattr(cls, meth, functools.wraps(f)(timed))
        undo.append((cls, meth, f))
    t0 = time.perf_counter()
    try:
        for s in range(0, steps * C, C):
            learner.predict(extra[0][s : s + C])
            learner.update(extra[0][s : s + C], extra[1][s : s + C])
    finally:
        for cls, meth, f in undo:
            setattr(cls, meth, f)
    totals["step"] = time.perf_counter() - t0
    return {name: 1e3 * sec / steps for name, sec in totals.items()}


def kernel_floor(learner, C: int, reps: int) -> dict[str, float]:
    """Milliseconds of the transformer step's compute, each kernel timed alone in a loop (warm
    caches, no Python between ops beyond the loop): the fused AdamW step over all its parameters,
    and the network's matrix products (per linear layer: the forward product and the backward's
    two, over ``R * C`` rows: every stream's chunk). A lower bound on what any implementation of
    the same step pays for these; attention, norms, the read-outs and the rest come on top."""
    import torch
    from torch.optim.adamw import adamw

    if not hasattr(learner, "model"):
        raise SystemExit("--floor times the transformer learner's step only")

    def per_rep(f) -> float:
        for _ in range(max(reps // 10, 3)):
            f()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return 1e3 * (time.perf_counter() - t) / reps

    n = sum(p.numel() for p in learner.model.parameters())
    p, grad, m, v = (torch.randn(n) for _ in range(4))
    v.abs_()
    step = torch.zeros(())
    adam = per_rep(lambda: adamw([p], [grad], [m], [v], [], [step], fused=True, amsgrad=False, beta1=0.9,
                                 beta2=0.99, lr=1e-4, weight_decay=0.01, eps=1e-8, maximize=False,
                                 grad_scale=None, found_inf=None))
    rows = learner.R * C * learner.model.tokens_per_example
    layers = [(torch.randn(rows, mod.in_features), mod.weight.detach().clone(), torch.randn(rows, mod.out_features))
              for name, mod in learner.model.named_modules()
              if isinstance(mod, torch.nn.Linear) and not name.startswith("label")]  # label terms: no gradient at C = 1

    def products():
        for x, w, gy in layers:
            x @ w.T, gy @ w, gy.T @ x  # forward, input gradient, weight gradient

    return {"parameters": n, "adamw_ms": adam, "matmul_ms": per_rep(products), "linear_layers": len(layers)}


class Worker:
    """A worker subprocess of one implementation for one (D, C), driven step block by block."""

    def __init__(self, stage: Path, src: Path, D: int, C: int, args: argparse.Namespace, learner: str,
                 options: list[str]) -> None:
        cmd = [sys.executable, __file__, "--worker", "--stage", str(stage), "--dim", str(D), "--chunk", str(C),
               "--steps", str(args.steps), "--threads", str(args.threads), "--profile-rows", str(args.profile_rows),
               "--learner", learner, *[f"--option={o}" for o in options]]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.log = tempfile.TemporaryFile(mode="w+")  # the worker's stderr, shown if it fails
        self.proc = subprocess.Popen(cmd, cwd=str(src), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.totals = {"wall": 0.0, "cpu": 0.0, "nll": 0.0, "examples": 0}
        self.ratios: list[float] = []

    def fail(self) -> None:
        self.log.seek(0)
        raise SystemExit(f"worker {self.proc.args} failed (exit code {self.proc.wait()}):\n{self.log.read()}")

    def wait_ready(self) -> None:
        if self.proc.stdout.readline().strip() != "ready":
            self.fail()

    def ask(self, command: str, steps: int) -> dict:
        self.proc.stdin.write(f"{command} {steps}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.fail()
        return json.loads(line)

    def run(self, steps: int) -> dict:
        rec = self.ask("run", steps)
        for key in self.totals:
            self.totals[key] += rec[key]
        return rec

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def compare(trees: dict[str, tuple[Path, Path]], D: int, C: int, args: argparse.Namespace,
            learners: dict[str, tuple[str, list[str]]]) -> dict[str, Worker]:
    """Both implementations at once, in lock step: blocks of ``--block`` steps, alternating,
    the order flipping every block, so that both see the same load on the machine (``learners``:
    each side's learner class path and options)."""
    workers = {name: Worker(*tree, D, C, args, *learners[name]) for name, tree in trees.items()}
    try:
        for w in workers.values():
            w.wait_ready()
        names = list(workers)
        for i, done in enumerate(range(0, args.steps, args.block)):
            steps = min(args.block, args.steps - done)
            recs = {name: workers[name].run(steps) for name in (names if i % 2 == 0 else names[::-1])}
            workers["current"].ratios.append(recs["baseline"]["wall"] / recs["current"]["wall"])
        if args.phases:
            recs = {name: w.ask("phases", args.phases) for name, w in workers.items()}
            keys = list(dict.fromkeys(k for rec in recs.values() for k in rec))
            from ocl.report import format_table

            print(f"\nD={D} C={C}: ms per step by method over {args.phases} steps (inclusive: a method's time "
                  "contains that of the methods it calls; timers add a little)")
            print(format_table([[k] + [f"{recs[n][k]:.3f}" if k in recs[n] else "-" for n in recs] for k in keys],
                               ["method", *recs]))
        if args.floor:
            rec = workers["current"].ask("floor", args.floor)
            print(f"\ncurrent, D={D} C={C}: kernels alone, {rec['parameters']:,} parameters: fused AdamW step "
                  f"{rec['adamw_ms']:.3f} ms, the {rec['linear_layers']} linear layers' forward + backward products "
                  f"{rec['matmul_ms']:.3f} ms (a lower bound on those parts of a step)")
        if args.profile:
            for name, w in workers.items():
                rec = w.ask("profile", args.profile)
                print(f"\n{name}, D={D} C={C}: torch.profiler over {args.profile} steps, "
                      f"{rec['aten_calls_per_step']:.0f} top-level ATen calls per step\n{rec['table']}")
    finally:
        for w in workers.values():
            w.close()
    return workers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git ref of the code to compare against")
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 1280], help="feature dims D")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 8], help="chunk sizes C")
    ap.add_argument("--steps", type=int, default=400, help="timed predict + update steps (C examples each)")
    ap.add_argument("--block", type=int, default=20, help="steps per turn of each implementation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--learner", default="ocl.learners.transformer.TransformerLearner", metavar="MODULE.CLASS",
                    help="the learner to time (default: the transformer; e.g. ocl.learners.linear.LinearLearner)")
    ap.add_argument("--option", action="append", default=[], help="learner option KEY=VALUE (repeatable)")
    ap.add_argument("--baseline-learner", default=None, metavar="MODULE.CLASS",
                    help="time this learner on the baseline side instead of --learner: two learners side by side "
                         "(with --baseline HEAD, both from this checkout)")
    ap.add_argument("--baseline-option", action="append", default=None, metavar="KEY=VALUE",
                    help="the baseline learner's options (default: --option's, or none with --baseline-learner)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the timing, print each implementation's top ops (torch.profiler) over STEPS steps")
    ap.add_argument("--phases", type=int, default=0, metavar="STEPS",
                    help="after the timing, print each implementation's ms per step by method over STEPS steps")
    ap.add_argument("--floor", type=int, default=0, metavar="REPS",
                    help="after the timing, time the current step's AdamW and matrix products alone (REPS repetitions)")
    ap.add_argument("--profile-rows", type=int, default=15, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from ocl.report import format_table  # this checkout's (the parent process never imports the baseline)

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], check=True, capture_output=True, text=True).stdout.strip()

    rev, head = git("rev-parse", "--short", args.baseline), git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        base_src = export_ref(args.baseline, Path(tmp) / "baseline-src")
        trees = {"baseline": (stage_package(base_src, Path(tmp) / "baseline"), base_src),
                 "current": (stage_package(REPO, Path(tmp) / "current"), REPO)}
        base_options = args.baseline_option if args.baseline_option is not None else (
            [] if args.baseline_learner else args.option)
        learners = {"baseline": (args.baseline_learner or args.learner, base_options), "current": (args.learner, args.option)}
        for D in args.dims:
            for C in args.chunks:
                w = compare(trees, D, C, args, learners)
                b, c = w["baseline"].totals, w["current"].totals
                row = [D, C]
                for key in ("wall", "cpu"):
                    eb, ec = b["examples"] / b[key], c["examples"] / c[key]
                    row += [f"{eb:.0f}", f"{ec:.0f}", f"{ec / eb:.2f}x"]
                ratios = w["current"].ratios
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3  # one block: no spread
                rows.append(row + [f"{q[0]:.2f}-{q[2]:.2f}", f"{b['nll'] / b['examples']:.6f}",
                                   f"{c['nll'] / c['examples']:.6f}"])
                print(f"D={D} C={C} done", file=sys.stderr, flush=True)

    other = f" vs {args.baseline_learner.rpartition('.')[2]} (options: {base_options or 'defaults'})" if args.baseline_learner else ""
    print(f"\n{args.learner.rpartition('.')[2]}{other}, predict + update, {args.threads} thread(s); baseline {args.baseline} ({rev}), "
          f"current {head}{' + uncommitted changes' if dirty else ''}; options: {args.option or 'defaults'}; "
          f"{args.steps} steps each, in alternating blocks of {args.block}")
    print("ex/s: examples per wall-clock second; per CPU s: per second of the worker's CPU time; "
          "block IQR: interquartile range of the per-block wall-clock speed-up")
    print(format_table(rows, ["D", "C", "baseline ex/s", "current ex/s", "speed-up", "baseline per CPU s",
                              "current per CPU s", "speed-up", "block IQR", "log-loss baseline",
                              "log-loss current"]))


if __name__ == "__main__":
    main()
