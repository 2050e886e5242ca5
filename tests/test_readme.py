"""The documentation's examples, executed as written (README.md and the pages of docs/).

- The plug-in example (docs/extending.md): the code block after ``<!-- readme-example: my_ocl.py -->``
  is saved as ``my_ocl.py`` and every command of the block after ``<!-- readme-example: commands -->``
  is run with its overrides; the "Python API" block is executed.
- Every command of a block marked ``<!-- test-commands -->`` (cheap ones: digits, ``debug=default``)
  is run too.

Commands run in-process, through hydra's compose API, plus a run directory and cache under
tmp_path, so the documentation cannot drift from the code.
"""

import math
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from ocl.compare import run_compare
from ocl.extract import run_extract
from ocl.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]
OCL = (".venv/bin/ocl", "ocl")


def commands(block: str) -> list[list[str]]:
    """Shell lines (backslash continuations joined) -> argv lists."""
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def compose_command(command: str, overrides: list[str], tmp_path: Path):
    """The config ``ocl <command> <overrides>`` runs, with progress bars off and a private cache."""
    ours = ["progress=false", f"cache_dir={tmp_path / 'cache'}"]
    extra = ["plots=false"] if command == "compare" else []  # PNGs are tested in test_compare.py
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name=command, overrides=[*overrides, *ours, *extra])


def test_readme_plugin_example_runs(tmp_path, monkeypatch, readme_example):
    (tmp_path / "my_ocl.py").write_text(readme_example("my_ocl.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cmds = commands(readme_example("commands"))
    assert [c[:2] for c in cmds] == [[".venv/bin/ocl", "run"], [".venv/bin/ocl", "compare"]]
    for i, (_, command, *overrides) in enumerate(cmds):
        cfg = compose_command(command, overrides, tmp_path)
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


def test_readme_python_api_example_runs(capsys, readme_example):
    """The "Python API" block: run_stream and the loop written out agree, on a stream that is easy."""
    namespace: dict = {}
    exec(compile(readme_example("python-api"), "docs/extending.md:python-api", "exec"), namespace)
    summary = namespace["result"].tracker.summary()
    assert summary["n_examples"] == len(namespace["stream"]) == 1000
    assert namespace["correct"] / 1000 == summary["avg_online_accuracy"] > 0.8
    assert namespace["result"].acc.shape == (2, 2)
    assert capsys.readouterr().out.count("\n") >= 3


@pytest.mark.parametrize("name", ["my_ocl.py", "commands", "python-api"])
def test_readme_example_blocks_exist(name, readme_example):
    assert readme_example(name).strip()


def test_the_docs_have_commands_to_test(docs_commands):
    """The ``test-commands`` blocks are found (a changed marker must not make the next test vanish)."""
    pages = {page for page, _ in docs_commands}
    assert {"commands.md", "learners.md", "metrics.md"} <= pages


def test_docs_command_runs(doc_command, tmp_path, monkeypatch):
    """One command of a ``<!-- test-commands -->`` block, run as written (in-process)."""
    page, argv = doc_command
    assert argv[0] in OCL and argv[1] in ("run", "compare", "extract"), f"{page}: not an ocl command: {argv}"
    monkeypatch.chdir(tmp_path)
    cfg = compose_command(argv[1], argv[2:], tmp_path)
    if argv[1] == "run":
        res = run_experiment(cfg, tmp_path / "run")
        assert res["n_examples"] > 0 and math.isfinite(res["mean_log_loss"])
        assert (tmp_path / "run" / "results.json").exists()
    elif argv[1] == "compare":
        recs = run_compare(cfg, tmp_path / "compare")["records"]
        assert recs and all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    else:
        entries = run_extract(cfg)
        assert entries and all((tmp_path / "cache") in Path(e["path"]).parents for e in entries), entries
