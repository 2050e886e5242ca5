"""ocl: online continual learning over frozen features, scored prequentially.

The Python API (the ``ocl`` command is a thin layer over it)::

    import ocl
    result = ocl.run_stream(learner, feats, stream)   # the prequential loop over plain objects
    result.tracker.summary()                         # online accuracy, log-loss, ...

- :func:`run_stream` (with :class:`RunResult`): predict each chunk, score it, then learn from it;
- :class:`Learner`: the base class of every learner (``predict`` before the labels, ``update`` after);
- :class:`Source`, :class:`ArrayImageSet`: data; :class:`Stream`: what a protocol
  (``ocl.streams.protocols.split``, ``iid``, ``permuted``, ``bursty``) makes of a source;
- :func:`run_experiment`, :func:`run_compare`: what ``ocl run`` and ``ocl compare`` do, from a
  composed config and a run directory;
- :class:`OCLError`: every error a user can fix.

Everything but :class:`OCLError` is imported on first use, so ``import ocl`` (and the CLI's
start-up) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ocl.errors import OCLError

if TYPE_CHECKING:
    from ocl.compare import run_compare
    from ocl.learners.base import Learner
    from ocl.run import run_experiment
    from ocl.runner import RunResult, run_stream
    from ocl.streams.base import ArrayImageSet, Source
    from ocl.streams.protocols import Stream

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY = {
    "run_stream": "ocl.runner", "RunResult": "ocl.runner", "Learner": "ocl.learners.base",
    "Source": "ocl.streams.base", "ArrayImageSet": "ocl.streams.base", "Stream": "ocl.streams.protocols",
    "run_experiment": "ocl.run", "run_compare": "ocl.compare",
}
__all__ = ["OCLError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'ocl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
