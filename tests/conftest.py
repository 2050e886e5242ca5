import os

# Tests must never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OCL_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "test-features"))
