"""The ``debug`` config group (configs/debug/default.yaml): a smoke run of a few seconds."""

from hydra import compose, initialize_config_module

from ocl.run import run_experiment


def compose_cfg(name, *overrides):
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_debug_cuts_the_stream_and_wins_over_a_preset_but_not_over_the_command_line():
    plain = compose_cfg("compare", "experiment=bench_cifar_split")
    assert plain.seeds == 3 and plain.protocol.max_examples is None and plain.plots is True
    cfg = compose_cfg("compare", "experiment=bench_cifar_split", "debug=default")
    assert cfg.protocol.max_examples == 300 and cfg.seeds == 1 and cfg.plots is False and cfg.threads == 1
    assert cfg.protocol.n_tasks == 5 and cfg.backbone.image_size == 128  # the preset is otherwise kept
    assert compose_cfg("compare", "debug=default", "protocol.max_examples=40").protocol.max_examples == 40
    assert compose_cfg("run", "debug=default").protocol.max_examples == 300


def test_ocl_run_debug_is_a_short_run(tmp_path):
    cfg = compose_cfg("run", "debug=default", "progress=false", f"cache_dir={tmp_path / 'c'}")
    res = run_experiment(cfg, tmp_path / "r")
    assert res["n_examples"] == 300 and res["threads"] == 1
