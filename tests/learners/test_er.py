import functools

import pytest
import torch

from ocl.errors import OCLError
from ocl.learners.checks import assert_log_probs, prequential
from ocl.learners.checks import clusters as make_clusters
from ocl.learners.er import ERLearner
from ocl.learners.memory import ExampleBuffer

D, K = 8, 4
clusters = functools.partial(make_clusters, dim=D, classes=K, spread=3.0)  # (n, D) features, (n,) labels


# --- the buffer ---------------------------------------------------------------------------


def test_buffer_size_is_bounded_and_memory_preallocated():
    buf = ExampleBuffer(capacity=7, dim=3, seed=0)
    ptr = buf.x.data_ptr()
    for _ in range(0, 50, 4):
        buf.add(torch.randn(4, 3), torch.arange(4))
        assert buf.size == min(buf.seen, 7)
    assert buf.seen == 52 and buf.size == 7 and buf.x.shape == (7, 3) and buf.x.data_ptr() == ptr


def test_reservoir_keeps_every_position_with_equal_probability():
    n, cap, trials = 40, 10, 2000
    hits = torch.zeros(n)
    for t in range(trials):
        buf = ExampleBuffer(cap, dim=1, seed=t)
        for s in range(0, n, 3):  # odd chunk size: chunks straddle the "full" point
            ids = torch.arange(s, min(s + 3, n))
            buf.add(ids[:, None].float(), ids)
        hits[buf.contents()[1]] += 1
    freq = hits / trials  # each position should be kept with probability cap / n = 0.25
    assert (freq - cap / n).abs().max() < 0.05
    assert abs(freq[:20].mean() - freq[20:].mean()) < 0.02  # no bias to early or late items


def test_reservoir_is_deterministic_given_seed():
    def fill(seed):
        buf = ExampleBuffer(5, dim=1, seed=seed)
        for i in range(30):
            buf.add(torch.tensor([[float(i)]]), torch.tensor([i]))
        return buf.contents()[1].clone(), buf.sample(3)[1]

    a, b, c = fill(1), fill(1), fill(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_fifo_keeps_the_most_recent():
    buf = ExampleBuffer(4, dim=1, policy="fifo")
    ids = torch.arange(11)
    buf.add(ids[:6, None].float(), ids[:6])
    buf.add(ids[6:, None].float(), ids[6:])
    assert sorted(buf.contents()[1].tolist()) == [7, 8, 9, 10]


def test_sample_returns_distinct_stored_examples():
    buf = ExampleBuffer(20, dim=2, seed=0)
    buf.add(torch.randn(12, 2), torch.arange(12))
    _, y = buf.sample(5)
    assert len(set(y.tolist())) == 5 and buf.sample(50)[1].shape == (12,)
    with pytest.raises(OCLError):
        ExampleBuffer(0, 2)


# --- the learner --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk,hidden", [(1, 0), (10, 0), (10, 32)])
def test_er_beats_chance_with_proper_log_probs(chunk, hidden):
    x, y = clusters(400)
    er = ERLearner(D, K, seed=0, buffer_size=50, hidden=hidden)
    lp = prequential(er, x, y, chunk)
    assert_log_probs(lp)
    assert (lp.argmax(1) == y).float()[-200:].mean() > 0.8
    assert er.buffer.size == 50  # bounded memory


def test_er_is_label_blind_seeded_and_pure():
    x, y = clusters(60)
    y2 = y.clone()
    y2[20:30] = (y[20:30] + 1) % K
    a = prequential(ERLearner(D, K, seed=3, buffer_size=16), x, y, 10)
    a2 = prequential(ERLearner(D, K, seed=3, buffer_size=16), x, y, 10)
    b = prequential(ERLearner(D, K, seed=3, buffer_size=16), x, y2, 10)
    assert torch.equal(a, a2)  # deterministic given the seed
    assert torch.equal(a[:30], b[:30]) and not torch.allclose(a[30:], b[30:])
    er = ERLearner(D, K, seed=0)
    er.update(x, y)
    assert torch.equal(er.predict(x), er.predict(x))


def test_replay_batch_comes_from_earlier_chunks_only():
    er = ERLearner(D, K, seed=0, buffer_size=8, replay_batch_size=8)
    seen = []
    sample = er.buffer.sample
    er.buffer.sample = lambda n: seen.append(er.buffer.size) or sample(n)
    x, y = clusters(12)
    er.update(x[:4], y[:4])
    er.update(x[4:], y[4:])
    assert seen == [0, 4]  # the first step replays nothing; the second only chunk 1
