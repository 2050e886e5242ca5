import logging
import os
import signal
from types import SimpleNamespace

import pytest
import torch

# Without CUDA the Triton kernels run in triton's CPU interpreter, which must be chosen before
# anything imports triton (torch may, e.g. torch.compile): here, not in the kernels' test module,
# or whichever test imported triton first would decide it for the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests must never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OCL_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "test-features"))

# A test run started with SIGINT ignored (a background job of a non-interactive shell, nohup) would
# hand that on to every process the tests start, and the tests that interrupt one as Ctrl-C does
# would see it shrug SIGINT off. Give them a terminal's disposition: a handled signal is reset to
# the default at exec, so the children's Python raises KeyboardInterrupt again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster of 2 CPUs, started once, when the first test needs it, for every
    Ray test of the session (skipped without the `ray` extra: pip install -e ".[ray]").

    ``modules``: a folder on the Ray workers' PYTHONPATH, for helper modules the tests write
    (a learner or extractor a worker must import by name)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    modules = tmp_path_factory.mktemp("ray_modules")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from tests
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback test cluster: no token written to ~/.ray
    path = os.pathsep.join(p for p in (str(modules), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield SimpleNamespace(modules=modules, address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def doc_pages() -> list:
    """The user documentation whose examples the tests run: README.md and the pages of docs/
    (not docs/research/, the measurement logs)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def doc_example(name: str) -> str:
    """The code block marked ``<!-- readme-example: name -->`` in README.md or a docs/ page
    (exactly one of them)."""
    import re

    found = [m.group(1) for page in doc_pages()
             for m in re.finditer(rf"<!-- readme-example: {re.escape(name)} -->\s*```\w*\n(.*?)```", page.read_text(), re.S)]
    assert len(found) == 1, f"{len(found)} code blocks marked readme-example: {name} in README.md and docs/*.md (want 1)"
    return found[0]


def doc_commands() -> list:
    """Every command of the code blocks marked ``<!-- test-commands -->`` in README.md and the
    docs/ pages, as ``(page name, argv)`` (backslash continuations joined)."""
    import re
    import shlex

    out = []
    for page in doc_pages():
        for m in re.finditer(r"<!-- test-commands -->\s*```\w*\n(.*?)```", page.read_text(), re.S):
            for line in m.group(1).replace("\\\n", " ").splitlines():
                if line.strip():
                    out.append((page.name, shlex.split(line)))
    return out


@pytest.fixture(scope="session")
def docs_commands():
    """:func:`doc_commands`: every ``(page, argv)`` of the docs' ``test-commands`` blocks."""
    return doc_commands()


def pytest_generate_tests(metafunc):
    """``doc_command``: one test per command of the docs' ``test-commands`` blocks."""
    if "doc_command" in metafunc.fixturenames:
        cmds = doc_commands()
        metafunc.parametrize("doc_command", cmds, ids=[f"{page}:{' '.join(argv[1:])}" for page, argv in cmds])


@pytest.fixture(scope="session")
def readme_example():
    """``readme_example(name)``: the code block marked ``<!-- readme-example: name -->`` in
    README.md or a docs/ page (see :func:`doc_example`)."""
    return doc_example


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


@pytest.fixture
def shared_data():
    """The project's real data folder (CIFAR-10 JPEG zip, EMNIST-letters sample; see
    shared/data/README.md): $OCL_SHARED_DATA, or ../shared/data beside the checkout or beside
    its folder of worktrees. Skips the test where there is none."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for d in (os.environ.get("OCL_SHARED_DATA"), repo.parent / "shared" / "data", repo.parent.parent / "shared" / "data"):
        if d and (Path(d) / "README.md").exists():
            return Path(d)
    pytest.skip("needs the project's shared data folder (../shared/data or $OCL_SHARED_DATA)")


ROWMEANS_BACKBONE = '''
import numpy as np
import torch
from ocl.streams.features import Extractor

class RowMeans(Extractor):
    """A cached backbone, exact per image: (n, H, W) -> (n, 8) row means."""
    feature_dim = 8

    def key(self):
        return "rowmeans/v1"

    def __call__(self, batch):
        return torch.from_numpy(np.asarray(batch, np.float32).reshape(len(batch), 8, -1).mean(axis=2))
'''


@pytest.fixture
def rowmeans_backbone(tmp_path, monkeypatch) -> str:
    """A tiny cached backbone, exact per image ((n, H, W) -> (n, 8) row means), importable as a
    plug-in: returns its ``_target_``."""
    (tmp_path / "rowmeans_backbone.py").write_text(ROWMEANS_BACKBONE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rowmeans_backbone.RowMeans"
