"""The ``experiment`` config group (configs/experiment/*.yaml): presets for ocl run, compare and
extract; the five benchmark streams say what the benchmark is."""

import os
import re
from importlib import resources

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ocl.cli import main
from ocl.experiment import build
from ocl.streams.custom import to_source

BENCH = ("bench_cifar_split", "bench_cifar_iid", "bench_cifar_permuted", "bench_cifar_bursty", "bench_emnist_split")


def compose_cfg(name, *overrides):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_the_group_holds_the_five_benchmark_streams_as_global_presets():
    folder = resources.files("ocl.configs").joinpath("experiment")
    names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    assert names == sorted(BENCH)
    for name in names:
        assert folder.joinpath(f"{name}.yaml").read_text().startswith("# @package _global_\n"), name


@pytest.mark.parametrize("command", ["run", "compare", "extract"])
@pytest.mark.parametrize("name", BENCH)
def test_benchmark_streams_resolve_for_every_command(command, name, monkeypatch):
    monkeypatch.delenv("OCL_SHARED_DATA", raising=False)
    cfg = OmegaConf.to_container(compose_cfg(command, f"experiment={name}"), resolve=True)
    protocol = name.rsplit("_", 1)[1]
    assert cfg["protocol"]["_target_"] == f"ocl.streams.protocols.{protocol}"
    assert cfg["backbone"]["_target_"] == "ocl.streams.features.TimmExtractor"
    assert (cfg["backbone"]["model"], cfg["backbone"]["image_size"]) == ("efficientnet_lite0", 128)
    assert cfg["seeds"] == 3 and cfg["stream"]["download"] is False
    assert {"split": ("n_tasks", 5), "permuted": ("segment_length", 1000), "bursty": ("stay", 0.9),
            "iid": ("max_examples", None)}[protocol] in cfg["protocol"].items()
    if command == "compare":
        assert cfg["learners"] is None  # every learner
    paths = [cfg["stream"]["root"]] if "cifar" in name else [cfg["stream"]["train_file"], cfg["stream"]["test_file"]]
    assert all(p.startswith("../shared/data/") for p in paths), paths
    # the data folder comes from OCL_SHARED_DATA when set
    monkeypatch.setenv("OCL_SHARED_DATA", "/elsewhere")
    again = OmegaConf.to_container(compose_cfg(command, f"experiment={name}"), resolve=True)
    key = "root" if "cifar" in name else "train_file"
    assert again["stream"][key] == cfg["stream"][key].replace("../shared/data", "/elsewhere")


def test_command_line_overrides_win_over_the_preset():
    cfg = compose_cfg("compare", "experiment=bench_cifar_split", "seeds=1", "backbone.image_size=224",
                      "learners=[linear]")
    assert (cfg.seeds, cfg.backbone.image_size, list(cfg.learners)) == (1, 224, ["linear"])
    # without a preset, nothing changes
    assert "seeds" not in compose_cfg("run") and compose_cfg("run") == compose_cfg("config")


def test_emnist_preset_splits_all_26_letters_into_tasks_of_6_5_5_5_5(monkeypatch, shared_data):
    monkeypatch.setenv("OCL_SHARED_DATA", str(shared_data))
    cfg = compose_cfg("compare", "experiment=bench_emnist_split")
    source = to_source(build(cfg, "stream"), name="emnist")
    assert (len(source.train), len(source.test), len(source.classes)) == (1000, 1000, 26)
    stream = build(cfg, "protocol", source, seed=0)
    sizes = [len(set(np.asarray(source.train.labels)[stream.order[stream.tasks == t]])) for t in range(5)]
    assert sizes == [6, 5, 5, 5, 5] and len(stream) == 1000


@pytest.mark.parametrize("name", [n for n in BENCH if "cifar" in n])
def test_cifar_presets_name_the_shared_zip(monkeypatch, shared_data, name):
    monkeypatch.setenv("OCL_SHARED_DATA", str(shared_data))
    assert os.path.isfile(compose_cfg("compare", f"experiment={name}").stream.root)


def test_ocl_run_and_compare_take_an_experiment_of_your_own(tmp_path, monkeypatch, capsys):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "tiny.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /protocol: iid\n  - override /learner: ncm\n"
        "protocol:\n  max_examples: 60\nseeds: 2\n")
    common = ["progress=false", f"cache_dir={tmp_path / 'c'}", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
              "experiment=tiny"]
    main(["run", *common, f"hydra.run.dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert "digits / iid" in out and "ncm (chunk 1, seed 0)" in out and re.search(r"\nexamples +60\n", out)
    main(["compare", *common, "learners=[recent]", f"hydra.run.dir={tmp_path / 'cmp'}"])
    out = capsys.readouterr().out
    assert "digits / iid: 60 examples" in out and "seeds [0, 1]" in out
