"""README's "Plug in your own stream / learner" example, executed as written.

The code block after ``<!-- readme-example: my_ocl.py -->`` is saved as ``my_ocl.py`` and
every command of the block after ``<!-- readme-example: commands -->`` is run with its
overrides (in-process, through hydra's compose API, plus a run directory and cache
under tmp_path), so the documentation cannot drift from the code.
"""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from ocl.compare import run_compare
from ocl.experiment import run_experiment

README = Path(__file__).resolve().parents[1] / "README.md"


def example_block(name: str) -> str:
    m = re.search(rf"<!-- readme-example: {re.escape(name)} -->\s*```\w*\n(.*?)```", README.read_text(), re.S)
    assert m, f"README.md has no code block marked readme-example: {name}"
    return m.group(1)


def commands(block: str) -> list[list[str]]:
    """Shell lines (backslash continuations joined) -> argv lists."""
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_plugin_example_runs(tmp_path, monkeypatch):
    (tmp_path / "my_ocl.py").write_text(example_block("my_ocl.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cmds = commands(example_block("commands"))
    assert [c[:2] for c in cmds] == [[".venv/bin/ocl", "run"], [".venv/bin/ocl", "compare"]]
    ours = ["progress=false", f"cache_dir={tmp_path / 'cache'}"]
    for i, (_, command, *overrides) in enumerate(cmds):
        with initialize_config_module(config_module="ocl.configs", version_base=None):
            extra = [] if command == "run" else ["plots=false"]  # PNGs are tested in test_compare.py
            cfg = compose(config_name=command,  # the configs of `ocl run` and `ocl compare`
                          overrides=[*overrides, *ours, *extra])
        if command == "run":
            res = run_experiment(cfg, tmp_path / f"run{i}")
            assert res["learner"] == "prototypes" and res["n_examples"] == 500
            assert res["avg_online_accuracy"] > 0.8  # well-separated blobs
        else:
            payload = run_compare(cfg, tmp_path / f"compare{i}")
            recs = payload["records"]
            assert len(recs) == 3 * 2 and all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
            proto = [r for r in recs if r["learner"] == "prototypes"]
            assert all(r["avg_online_accuracy"] > 0.8 for r in proto)
            assert (tmp_path / f"compare{i}" / "compare.json").exists()


@pytest.mark.parametrize("name", ["my_ocl.py", "commands"])
def test_readme_example_blocks_exist(name):
    assert example_block(name).strip()
