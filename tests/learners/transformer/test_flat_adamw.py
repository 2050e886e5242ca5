"""FlatAdamW: the same updates as torch.optim.AdamW + clip_grad_norm_, on flat buffers."""

import copy
import io

import pytest
import torch
import torch.nn as nn

from ocl.learners.transformer.flat_adamw import FlatAdamW


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3), nn.Embedding(4, 3))


def groups(model: nn.Module) -> list:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    return [(decay, 0.1), ([p for p in model.parameters() if p.dim() < 2], 0.0)]


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(6, 5, generator=g) * (1 + 10 * (step % 3 == 0))  # some steps clip, some do not
    out = model[2](model[1](model[0](x))).pow(2).sum()
    # the embedding gets a gradient on odd steps only: on even steps AdamW must still decay it
    return out + (model[3].weight.sum() if step % 2 else 0)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_same_updates_as_torch_adamw_with_clip_grad_norm(clip):
    ref, flat = net(), net()
    opt_ref = torch.optim.AdamW([{"params": ps, "weight_decay": wd} for ps, wd in groups(ref)],
                                lr=1e-2, betas=(0.9, 0.99), fused=True)
    opt = FlatAdamW(groups(flat), betas=(0.9, 0.99), grad_clip=clip)
    for p in ref.parameters():  # a gradient from the start, so that AdamW steps every parameter each time
        p.grad = torch.zeros_like(p)
    clipped = 0
    for step in range(8):
        lr = 1e-2 * (step + 1) / 8
        for group in opt_ref.param_groups:
            group["lr"] = lr
        opt_ref.zero_grad(set_to_none=False)  # zeros, not None: the embedding's zero gradient is decayed
        loss_of(ref, step).backward()
        if clip:
            clipped += nn.utils.clip_grad_norm_(ref.parameters(), clip) > clip
        opt_ref.step()
        opt.zero_grad()
        loss_of(flat, step).backward()
        opt.step(lr)
        for a, b in zip(ref.parameters(), flat.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert clipped > 0 or not clip
    assert not torch.equal(next(ref.parameters()), next(net().parameters()))  # it did train


def test_parameters_and_gradients_are_views_of_the_flat_buffers():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = FlatAdamW(groups(model), grad_clip=1.0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # values kept
    opt.zero_grad()
    loss_of(model, 1).backward()
    base = opt.flat_grad.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == base for p in model.parameters())
    total = torch.cat([p.grad.reshape(-1) for ps, _ in groups(model) for p in ps])
    assert torch.equal(total, opt.flat_grad) and opt.flat_grad.abs().sum() > 0
    opt.step(0.1)
    assert all(p.untyped_storage().data_ptr() == opt.flat.untyped_storage().data_ptr() for p in model.parameters())


def test_pickled_or_deep_copied_it_continues_exactly():
    model = net()
    opt = FlatAdamW(groups(model), grad_clip=1.0)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step(1e-2)
    buf = io.BytesIO()
    torch.save({"model": model, "opt": opt}, buf)  # as a checkpoint pickles the learner whole
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    twin = copy.deepcopy({"model": model, "opt": opt})  # copies the parameters apart from the buffer
    original = {"model": model, "opt": opt}
    for state in (restored, twin, original):
        for step in range(3, 6):
            state["opt"].zero_grad()
            loss_of(state["model"], step).backward()
            state["opt"].step(1e-2)
    for copied in (restored, twin):
        for a, b in zip(copied["model"].parameters(), model.parameters()):
            assert torch.equal(a, b)
        flat = copied["opt"].flat.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == flat for p in copied["model"].parameters())
