"""``learner.cuda_graph``: captured predict/train steps compute what the eager learner does.

Without a GPU the graph machinery runs with ``capture=False``: the same step functions on
the same static tensors, only ``torch.cuda.graph`` itself is left out. The ``gpu`` tests
capture for real and compare against the eager learner on the GPU (not run on CPU-only
machines: they are skipped there).
"""

import pytest
import torch

from ocl.errors import OCLError
from ocl.learners.checks import clusters, prequential
from ocl.learners.transformer.cuda_graphs import StepGraphs
from ocl.learners.transformer import TransformerLearner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# The network alone: graphs capture its steps; the read-out experts run eagerly either way.
SMALL = dict(d_model=16, n_layers=2, n_heads=2, window=4, replay_streams=3, lr=1e-2, warmup=0)
CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("mode,C,G", [("kv", 1, 1), ("kv", 3, 1), ("context", 2, 1), ("kv", 1, 4), ("context", 2, 4)])
def test_static_step_functions_match_the_eager_learner(mode, C, G):
    x, y = clusters(31)  # 31 % C != 0 for C = 2, 3: a short last chunk (an uncaptured shape)
    eager = TransformerLearner(8, 3, seed=0, label_mode=mode, segment=G, **SMALL)
    graphed = TransformerLearner(8, 3, seed=0, label_mode=mode, segment=G, **SMALL)
    graphed.graphs = StepGraphs(graphed, capture=False)
    assert not graphed.shares_forward(1)
    a, b = prequential(eager, x, y, C), prequential(graphed, x, y, C)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert {k[0] for k in graphed.graphs.graphs} == {"predict", "train"}  # the static path did run
    # after the last step: 31 steps of float rounding (the static step's op order differs) have grown
    torch.testing.assert_close(graphed.evaluate(x[:5]), eager.evaluate(x[:5]), rtol=0, atol=1e-4)


def test_cuda_graph_needs_a_gpu_and_no_dropout():
    if not CUDA:
        with pytest.raises(OCLError, match="cuda_graph"):
            TransformerLearner(8, 3, cuda_graph=True)
    with pytest.raises(OCLError, match="dropout"):
        TransformerLearner(8, 3, cuda_graph=True, dropout=0.1, device="cuda" if CUDA else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["torch", "triton"])
@pytest.mark.parametrize("C,G", [(1, 1), (8, 1), (1, 8), (8, 32)])
def test_captured_steps_predict_like_the_eager_learner_on_the_gpu(attn, C, G):
    x, y = clusters(8 * 24, 32, 5)
    cfg = dict(d_model=64, n_heads=4, window=16, replay_streams=4, attn=attn, device="cuda", segment=G)
    eager = TransformerLearner(32, 5, seed=0, **cfg)
    graphed = TransformerLearner(32, 5, seed=0, cuda_graph=True, **cfg)
    a, b = prequential(eager, x, y, C), prequential(graphed, x, y, C)
    assert all(g.graph is not None for g in graphed.graphs.graphs.values()) and graphed.graphs.graphs
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    bad = x[:C].clone()
    bad[0, 0] = float("nan")
    before = graphed.opt.flat.clone()
    for _ in range(max(1, G // C)):  # a whole segment of them: its step is the one skipped
        graphed.predict(bad)
        graphed.update(bad, y[:C])
    assert graphed.skipped_updates == 1 and torch.equal(graphed.opt.flat, before)
