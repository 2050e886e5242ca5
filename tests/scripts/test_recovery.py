"""scripts/recovery.py: accuracy after each task switch, from steps.csv files."""

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def recovery(load_script):
    return load_script("recovery.py")


def write_run(path: Path, task: np.ndarray, correct: np.ndarray) -> Path:
    path.mkdir(parents=True)
    rows = ["step,task,label,pred,correct,loss,p_true"]
    rows += [f"{i},{t},0,0,{c},1.0,0.5" for i, (t, c) in enumerate(zip(task, correct))]
    (path / "steps.csv").write_text("\n".join(rows) + "\n")
    return path


def test_first_examples_after_a_switch_are_scored_per_learner(recovery, tmp_path, capsys):
    task = np.repeat(np.arange(4), 50)
    fast = np.ones(200)  # right from the first example after each switch
    slow = np.tile(np.r_[np.zeros(10), np.ones(40)], 4)  # wrong for the first 10 of every task
    write_run(tmp_path / "fast_s0", task, fast)
    write_run(tmp_path / "slow_s0", task, slow)
    plot = tmp_path / "curves.png"
    assert recovery.main([f"fast={tmp_path}/fast_s*", f"slow={tmp_path}/slow_s*", "--first", "20",
                          "--length", "50", "--smooth", "5", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    fast_row, slow_row = (line.split() for line in out[1:3])
    assert fast_row[0] == "fast" and float(fast_row[3]) == 1.0
    assert slow_row[0] == "slow" and float(slow_row[3]) == 0.5 and float(slow_row[6]) == 1.0
    assert plot.stat().st_size > 1000


def test_a_pattern_that_matches_nothing_is_an_error(recovery, tmp_path):
    with pytest.raises(SystemExit, match="no run directory"):
        recovery.main([f"x={tmp_path}/nothing*"])
