import numpy as np
import pytest

from ocl.errors import OCLError
from ocl.streams.digits import load_digits


def test_digits_split():
    src = load_digits()
    assert src.name == "digits" and src.classes == [str(i) for i in range(10)]
    assert len(src.train) + len(src.test) == 1797 and len(src.test) == 360
    x = src.train.get(np.arange(len(src.train)))
    assert x.shape == (1437, 8, 8, 1) and x.dtype == np.uint8 and x.max() == 255 and x.min() == 0
    # stratified: every class is held out in proportion
    frac = np.bincount(src.test.labels, minlength=10) / np.bincount(
        np.concatenate([src.train.labels, src.test.labels]), minlength=10
    )
    assert np.all(np.abs(frac - 0.2) < 0.02)


def test_digits_deterministic():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert a.train.fingerprint() == b.train.fingerprint() and a.test.fingerprint() == b.test.fingerprint()
    assert a.test.fingerprint() != c.test.fingerprint()


def test_digits_fractions():
    assert load_digits(test_fraction=0).test is None
    assert len(load_digits(test_fraction=0.5).test) == 899
    with pytest.raises(OCLError, match="test_fraction"):
        load_digits(test_fraction=1.0)
    with pytest.raises(OCLError, match="stratified"):
        load_digits(test_fraction=0.001)
