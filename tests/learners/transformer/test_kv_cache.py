"""Ring-buffer KV cache: keys/values store their own token positions so window checks are exact."""

import pytest
import torch

from ocl.learners.transformer.kv_cache import KVCache


def _pos_kv(tpos: torch.Tensor, H: int, Dh: int, layer: int):
    """K = position, V = -position (+ layer offset), shaped (B, H, T, Dh)."""
    k = tpos[:, None, :, None].float().expand(-1, H, -1, Dh) + 1000 * layer
    return k, -k


def _write_stream(cache: KVCache, rows: torch.Tensor, start: int, chunks: list[int]) -> int:
    p = start
    for c in chunks:
        tpos = (p + torch.arange(c))[None].expand(len(rows), c)
        kv = [_pos_kv(tpos, cache.k.shape[2], cache.k.shape[4], layer) for layer in range(cache.n_layers)]
        cache.write(rows, tpos, [k for k, _ in kv], [v for _, v in kv])
        p += c
    return p


@pytest.mark.parametrize("S,chunks", [(4, [1] * 9), (5, [2, 3, 1, 4]), (3, [7]), (6, [6, 6, 1])],
                         ids=["S4-C1-wrap", "S5-mixed", "S3-chunk-gt-window", "S6-exact"])
def test_ring_holds_exactly_last_window_positions(S, chunks):
    cache = KVCache(n_layers=2, n_streams=2, n_heads=3, window=S, head_dim=2)
    end = _write_stream(cache, torch.tensor([0, 1]), 0, chunks)
    expect = set(range(max(0, end - S), end))
    for b in range(2):
        assert set(cache.pos[b].tolist()) - {-1} == expect
        for layer in range(2):
            k, v = cache.read(layer, slice(b, b + 1))
            valid = cache.pos[b] >= 0
            # every slot's K/V is the K/V written for the position it claims to hold
            torch.testing.assert_close(k[0, :, valid, :], cache.pos[b, valid].float()[None, :, None].expand(3, -1, 2) + 1000 * layer)
            torch.testing.assert_close(v[0], -k[0])


def test_partial_before_fill_marks_empty_slots():
    cache = KVCache(1, 1, 1, window=5, head_dim=1)
    _write_stream(cache, torch.tensor([0]), 0, [2])
    assert sorted(cache.pos[0].tolist()) == [-1, -1, -1, 0, 1]


def test_rows_are_independent_and_reset_empties_one_stream():
    cache = KVCache(n_layers=1, n_streams=3, n_heads=2, window=4, head_dim=2)
    _write_stream(cache, torch.arange(3), 10, [3])
    before = cache.k.clone(), cache.pos.clone()
    _write_stream(cache, torch.tensor([1]), 13, [2])  # only stream 1 moves on
    assert torch.equal(cache.k[:, [0, 2]], before[0][:, [0, 2]])
    assert torch.equal(cache.pos[[0, 2]], before[1][[0, 2]])
    assert set(cache.pos[1].tolist()) == {11, 12, 13, 14}
    cache.reset(1)
    assert (cache.pos[1] == -1).all() and (cache.k[:, 1] == 0).all() and (cache.v[:, 1] == 0).all()
    assert torch.equal(cache.pos[[0, 2]], before[1][[0, 2]])


def test_window_zero_caches_nothing():
    cache = KVCache(1, 1, 1, window=0, head_dim=4)
    _write_stream(cache, torch.tensor([0]), 0, [3])
    assert cache.pos.shape == (1, 0) and cache.read(0, slice(None))[0].shape == (1, 1, 0, 4)


def test_written_values_are_detached():
    cache = KVCache(1, 1, 1, window=2, head_dim=1)
    k = torch.ones(1, 1, 1, 1, requires_grad=True)
    cache.write(torch.tensor([0]), torch.tensor([[0]]), [k * 2], [k * 3])
    assert not cache.k.requires_grad and not cache.v.requires_grad


def test_labels_travel_with_their_slots_and_reset_clears_them():
    cache = KVCache(n_layers=1, n_streams=2, n_heads=1, window=3, head_dim=2)
    rows = torch.tensor([0, 1])
    for p in range(7):  # wraps twice; label of position p: 10 p (row 0), 10 p + 1 (row 1)
        tpos = torch.tensor([[p], [p]])
        kv = torch.zeros(2, 1, 2, 1, 1, 2)
        cache.write_stacked(rows, tpos, kv, labels=10 * tpos + torch.tensor([[0], [1]]))
    assert torch.equal(cache.labels, 10 * cache.pos + torch.tensor([[0], [1]]))
    cache.write_stacked(rows[:1], torch.tensor([[7]]), torch.zeros(2, 1, 1, 1, 1, 2))  # no labels: -1
    assert cache.labels[0, 7 % 3] == -1
    cache.reset(1)
    assert (cache.labels[1] == -1).all()
