import os

import pytest

# Tests must never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OCL_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "test-features"))


@pytest.fixture
def one_thread():
    """One torch thread for the test, the caller's setting restored after. The learners' tiny
    per-example steps only pay sync overhead for intra-op threads (10x slower or worse on a busy
    2-core machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
