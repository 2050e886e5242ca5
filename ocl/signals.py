"""Signal handlers installed for a block and restored after it (one home for the pattern)."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def handling(handler: Callable[[int, Any], None], *signums: int) -> Iterator[None]:
    """Run the block with ``handler`` for each of ``signums``; the previous handlers come back
    after it. A no-op outside the main thread, where Python cannot install handlers."""
    try:
        old = {s: signal.signal(s, handler) for s in signums}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raises :class:`KeyboardInterrupt` in the block, as Ctrl-C does (a batch job's
    scheduler stops a command the way a user would), instead of ending the process silently."""
    return handling(_interrupt, signal.SIGTERM)
