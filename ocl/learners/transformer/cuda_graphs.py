"""CUDA graphs of the transformer learner's two steps (``learner.cuda_graph=true``).

On a GPU the learner's step is hundreds of tiny kernels, and launching them from Python
costs more than running them. The learner's shapes are static (the KV cache is a fixed ring
buffer, the replay batch always R streams of C examples), so each step can be captured once
and replayed as one launch:

- **predict**: the gradient-free forward of stream 0's chunk over its cache;
- **train**: the forward of all R streams (labels in), loss, backward, gradient clipping and
  the AdamW step (:class:`~ocl.learners.transformer.flat_adamw.FlatAdamW`, which skips the step on the
  device when the loss is not finite and reads the learning rate from a device tensor).

Inputs are copied into static tensors before each replay; the cache, parameters and
optimizer state are read and written in place (their addresses never change). What is not
captured stays eager: the replay plan and history reads (host), the cache writes and resets
after a step, the temperature fit (host floats). A shape is captured on its second use
(the first step of a stream, before any replay, and a short last chunk run eagerly).

Replays compute exactly what the eager step computes (the same functions run inside the
capture); ``capture=False`` runs them eagerly on the static tensors, which lets the CPU
tests exercise everything here but ``torch.cuda.graph``.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from ocl.learners.transformer.learner import TransformerLearner
    from ocl.learners.transformer.replay import StepBatch


class _Graphed:
    """``body(**static_inputs)`` captured in a CUDA graph (or run eagerly: ``capture=False``).

    Args:
        body: the step; must not synchronise with the host.
        inputs: example inputs (copied: the static tensors replays read).
        state: tensors the body modifies in place and a warm-up run must leave untouched.
    """

    def __init__(self, body: Callable[..., tuple], inputs: dict[str, torch.Tensor], state: list[torch.Tensor],
                 capture: bool) -> None:
        self.body, self.inputs = body, {k: v.clone() for k, v in inputs.items()}
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            saved = [t.clone() for t in state]
            side = torch.cuda.Stream()  # warm-up off the capture stream: lazy initialisations
            side.wait_stream(torch.cuda.current_stream())  # (cuBLAS, autograd, Triton, compile) run here
            with torch.cuda.stream(side):
                for _ in range(2):
                    body(**self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            for t, s in zip(state, saved):  # the warm-up steps never happened
                t.copy_(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = body(**self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> tuple:
        """Outputs for ``inputs``; valid until the next call (static tensors)."""
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        if self.graph is None:
            self.outputs = self.body(**self.inputs)
        else:
            self.graph.replay()
        return self.outputs


class StepGraphs:
    """Captured predict and train steps of a :class:`~ocl.learners.transformer.TransformerLearner`,
    one graph per shape.

    Args:
        learner: the learner (its model, cache and optimizer are captured in place).
        capture: ``False`` runs the same bodies eagerly on static tensors (CPU tests).
    """

    def __init__(self, learner: TransformerLearner, capture: bool = True) -> None:
        self.learner, self.capture = learner, capture
        self.seen: Counter = Counter()
        self.graphs: dict[tuple, _Graphed] = {}

    def __getstate__(self) -> dict:  # a checkpoint: graphs do not pickle; they are captured again
        return {"learner": self.learner, "capture": self.capture}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["learner"], state["capture"])

    def _get(self, key: tuple, make: Callable[[], _Graphed]) -> _Graphed | None:
        """The graph for ``key``, captured on the key's second use (None before: run eagerly)."""
        if key not in self.graphs:
            self.seen[key] += 1
            if self.seen[key] < 2:
                return None
            self.graphs[key] = make()
        return self.graphs[key]

    def predict(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream 0's logits ``(C, K)`` and keys/values ``(2, L, 1, H, T, Dh)`` for ``x (1, C, D)`` at
        ``pos (1, C)`` (fresh tensors)."""
        body = self.learner._predict_forward
        graph = self._get(("predict", *x.shape), lambda: _Graphed(body, {"x": x, "pos": pos}, [], self.capture))
        if graph is None:
            return body(x, pos)
        logits, kv = graph(x=x, pos=pos)
        return logits.clone(), None if kv is None else kv.clone()

    def train(self, batch: StepBatch, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`TransformerLearner._train_step` of ``batch`` at learning rate ``lr``."""
        learner = self.learner
        lr_t = torch.tensor(lr, dtype=torch.float32, device=learner.device)
        inputs = {"xs": batch.xs, "ys": batch.ys, "pos": batch.pos, "ctx_pos": batch.ctx_pos, "lr": lr_t}
        if batch.q_lo is not None:  # segment > 1
            inputs["q_lo"] = batch.q_lo
        opt = learner.opt
        state = [opt.flat, opt.exp_avg, opt.exp_avg_sq, *(step for _, _, step in opt.groups)]
        graph = self._get(("train", *batch.xs.shape), lambda: _Graphed(learner._train_step, inputs, state,
                                                                         self.capture))
        if graph is None:
            return learner._train_step(**inputs)
        return graph(**inputs)
