import torch
import torch.nn.functional as F

from ocl.learners.common import HeadLearner, guarded_step
from ocl.learners.linear import LinearLearner


def _autograd_update(learner: HeadLearner, x: torch.Tensor, y: torch.Tensor) -> None:
    """The reference: loss, backward and torch.optim.SGD's step (what the closed form replaces)."""
    guarded_step(F.cross_entropy(learner.logits(x), y), learner.opt, "ref", 0)
    learner.observe(x)


def test_closed_form_sgd_step_equals_autograd_and_torch_sgd():
    gen = torch.Generator().manual_seed(0)
    fast = LinearLearner(6, 4, lr=0.7, weight_decay=0.01)
    ref = LinearLearner(6, 4, lr=0.7, weight_decay=0.01)
    assert fast._closed_form
    for t in range(60):
        C = 1 + t % 5
        x = torch.randn(C, 6, generator=gen) * 3 + 1
        y = torch.randint(4, (C,), generator=gen)
        torch.testing.assert_close(fast.predict(x), ref.predict(x))
        fast.update(x, y)
        _autograd_update(ref, x, y)
    torch.testing.assert_close(fast.head.weight, ref.head.weight)
    torch.testing.assert_close(fast.head.bias, ref.head.bias)
    assert fast.head.weight.abs().max() > 0.1  # it learned something


def test_closed_form_step_skips_non_finite_chunks():
    lin = LinearLearner(3, 2, lr=0.5)
    lin.update(torch.randn(2, 3), torch.tensor([0, 1]))
    before = [p.clone() for p in lin.head.parameters()]
    n = lin.norm.n
    for bad in (float("nan"), float("inf")):
        lin.update(torch.tensor([[1.0, bad, 0.0]]), torch.tensor([1]))
    assert lin.skipped_updates == 2
    assert lin.norm.n == n  # the bad inputs stay out of the statistics too
    for p, q in zip(lin.head.parameters(), before):
        assert torch.equal(p, q)


def test_mlp_and_momentum_keep_the_autograd_path():
    from ocl.learners.mlp import MLPLearner

    assert not MLPLearner(4, 3, hidden=8)._closed_form
    assert not HeadLearner(4, 3, 0, hidden=0, lr=0.1, momentum=0.9)._closed_form
    assert not HeadLearner(4, 3, 0, hidden=0, lr=0.1, optimizer="adam")._closed_form


def test_adam_is_torch_adam_on_a_float_and_on_a_vector():
    """The one closed-form Adam step (Temperature's and the log-linear pool's) is torch.optim.Adam's,
    for a Python float and for a float64 vector alike."""
    from ocl.learners.common import Adam

    g = torch.Generator().manual_seed(0)
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.05)
    vector, scalar = Adam(0.05, zeros=torch.zeros(3, dtype=torch.float64)), Adam(0.05)
    a, s = torch.zeros(3, dtype=torch.float64), 0.0
    for _ in range(10):
        grad = torch.randn(3, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        a = a - vector.delta(grad)
        s -= scalar.delta(float(grad[0]))
    torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-12)
    assert abs(s - float(p.detach()[0])) < 1e-12 and vector.steps == scalar.steps == 10
