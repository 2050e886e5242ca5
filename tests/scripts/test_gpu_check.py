"""``scripts/gpu_check.sh``: the GPU checks in one command. Without a GPU it must say so and stop
(exit 2) after reporting what it found, having imported ``ocl`` from this checkout's staged tree."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the checks (minutes)")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_a_gpu_says_so_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    p = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA GPU" in p.stderr
    log = (tmp_path / "out" / "device.log").read_text()
    assert "cuda: NOT AVAILABLE" in log
    assert "ocl from " in log  # it imported ocl, its kernels and the transformer from the staged tree
