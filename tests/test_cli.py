"""The console script as a user runs it (subprocesses: real argv parsing and exit codes)."""

import json
import os
import subprocess
import sys

import pytest

from ocl.cli import main


def ocl(*args, cwd, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "ocl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_run_prints_table_and_writes_results(tmp_path):
    p = ocl("run", f"hydra.run.dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'c'}", "progress=false",
            "protocol.n_tasks=2", "protocol.max_examples=300", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "avg online accuracy" in p.stdout and "cumulative log-loss (nats)" in p.stdout
    assert "near-future accuracy (S=100, every 20: 9 evals)" in p.stdout  # after steps 19, 39, ..., 179
    assert "[INFO]" not in p.stdout and "[INFO]" in p.stderr  # stdout is the table; logs go to stderr
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["n_examples"] == 300
    assert (tmp_path / "r" / ".hydra" / "config.yaml").exists()  # the config travels with the run


def test_unknown_config_key_is_an_error(tmp_path):
    p = ocl("run", "learner.lrr=0.1", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert p.returncode != 0
    assert "lrr" in p.stderr
    assert not (tmp_path / "r" / "results.json").exists()


def test_user_error_is_one_message_and_exit_2(tmp_path):
    p = ocl("run", "stream=imagefolder", f"stream.root={tmp_path / 'missing'}",
            f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert p.returncode == 2
    assert "error:" in p.stderr and str(tmp_path / "missing") in p.stderr
    assert "Traceback" not in p.stderr


def test_usage_and_unknown_command(capsys):
    main([])
    assert "ocl run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
