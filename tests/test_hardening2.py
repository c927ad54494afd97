"""Issue 25, hardening round two.

Item 1: nothing a preset, --config-dir or the command line sets makes Hydra instantiate or execute anything but the
allowlisted launcher, sweeper and callback classes; options that execute something come from the command line only.
Each malicious preset is refused in one line, exit 2, nothing run (the victim file untouched, no store, no outputs).

Item 8: an engine's export/conversion failure ends in one line carrying the cause; the full log is a file in the
run's folder (``<run_dir>/<plugin>_export.log``), not on stderr.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from conftest import CONF_DIR, run_cli

QUICK = ["runtime=quick", "dataset.max_samples=8"]


# -- item 1: a malicious preset in a temp --config-dir, through the CLI ---------------------------------------------------

@pytest.fixture()
def victim(tmp_path):
    f = tmp_path / "victim.txt"
    f.write_text("keep me")
    return f


def preset(tmp_path, name: str, body: str) -> Path:
    folder = tmp_path / "shared" / "experiment"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text("# @package _global_\n" + body)
    return tmp_path / "shared"


def refused(proc, line: str, victim, tmp_path):
    """Exit 2, the only stderr line is ``line`` (a prefix of it), nothing touched or created."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr[-2000:]
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def cli(tmp_path, config_dir, *args):
    return run_cli("--config-dir", str(config_dir), *args, *QUICK, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                   cwd=tmp_path, timeout=300)


def test_a_target_in_the_launchers_env_is_refused(tmp_path, victim):
    source = tmp_path / "other.txt"
    source.write_text("overwritten")
    conf = preset(tmp_path, "copy", f"hydra:\n  launcher:\n    env:\n      x:\n        _target_: shutil.copyfile\n"
                                    f"        _args_: ['{source}', '{victim}']\n")
    proc = cli(tmp_path, conf, "-m", "experiment=copy")
    refused(proc, "error: hydra.launcher.env.x._target_='shutil.copyfile': a nested _target_ is not allowed; only "
                  "hydra.launcher, hydra.sweeper and hydra.callbacks.<name> name a class", victim, tmp_path)


def test_a_target_under_the_ray_launchers_init_is_refused(tmp_path, victim):
    conf = preset(tmp_path, "ray_open", "hydra:\n  launcher:\n    init:\n"
                                        f"      x:\n        _target_: builtins.open\n        _args_: ['{victim}', w]\n")
    proc = cli(tmp_path, conf, "-m", "hydra/launcher=ray", "experiment=ray_open")
    refused(proc, "error: hydra.launcher.init.x._target_='builtins.open': a nested _target_ is not allowed",
            victim, tmp_path)


def test_a_target_under_the_sweeper_params_is_refused(tmp_path, victim):
    conf = preset(tmp_path, "params", "hydra:\n  sweeper:\n    params:\n      x:\n        _target_: builtins.open\n"
                                      f"        _args_: ['{victim}', w]\n")
    proc = cli(tmp_path, conf, "-m", "experiment=params")
    refused(proc, "error: hydra.sweeper.params.x._target_='builtins.open': a nested _target_ is not allowed",
            victim, tmp_path)


def test_a_launcher_python_from_a_preset_is_refused(tmp_path, victim):
    evil = tmp_path / "evil.sh"
    evil.write_text(f"#!/bin/sh\necho pwned > '{victim}'\n")
    evil.chmod(evil.stat().st_mode | stat.S_IXUSR)
    conf = preset(tmp_path, "python", f"hydra:\n  launcher:\n    python: {evil}\n")
    proc = cli(tmp_path, conf, "-m", "experiment=python")
    refused(proc, f"error: hydra.launcher.python='{evil}': names what the launcher executes, so it is taken from the "
                  "command line only, never from a preset or config file (give hydra.launcher.python=... on the "
                  "command line)", victim, tmp_path)


def test_a_launcher_python_from_the_command_line_is_accepted(tmp_path):
    proc = run_cli("--cfg", "hydra", f"hydra.launcher.python={sys.executable}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"python: {sys.executable}" in proc.stdout


# -- item 1: the same rules in-process (every config Hydra composes goes through the check) ----------------------------

@pytest.fixture()
def compose_with(tmp_path, monkeypatch):
    """Compose conf/ plus a preset folder on Hydra's search path, as the CLI's --config-dir does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator import hydra_patches
    from orchestrator.config import register_configs

    register_configs()
    hydra_patches.install_checks()
    monkeypatch.chdir(tmp_path)

    def _compose(body: str, *overrides: str):
        conf = preset(tmp_path, "p", body)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", return_hydra_config=True,
                           overrides=[f"hydra.searchpath=[file://{conf}]", "experiment=p", *overrides])

    yield _compose
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("body,message", [
    ("hydra:\n  launcher:\n    env:\n      LD_PRELOAD: /tmp/x.so\n",
     "hydra.launcher.env.LD_PRELOAD='/tmp/x.so': is an environment variable for the jobs (only thread/ISA tuning "
     "ones, e.g. OMP_*, ONEDNN_*, may come from a config), so it is taken from the command line only"),
    ("hydra:\n  job:\n    env_set:\n      CXX: ./evil.sh\n",
     "hydra.job.env_set.CXX='./evil.sh': is an environment variable for the jobs"),
    ("model:\n  trust_remote_code: true\n", "model.trust_remote_code=True: runs code shipped with the checkpoint"),
    ("hydra:\n  job_logging:\n    handlers:\n      file:\n        filename: /tmp/victim\n",
     "hydra.job_logging.handlers.file.filename='/tmp/victim': is a log file outside the run's folder"),
    ("hydra:\n  job_logging:\n    handlers:\n      console:\n        stream: ext://antigravity.x\n",
     "hydra.job_logging.handlers.console.stream='ext://antigravity.x': an ext:// object other than a standard "
     "stream is not allowed"),
    ("hydra:\n  job_logging:\n    handlers:\n      console:\n        class: logging.config.listen\n",
     "hydra.job_logging.handlers.console.class='logging.config.listen': a logging class outside the logging module"),
    ("hydra:\n  overrides:\n    hydra: ['hydra.launcher.python=/tmp/evil.sh']\n",
     "hydra.overrides=['hydra.launcher.python=/tmp/evil.sh']: set by a config; not allowed"),
    ("hydra:\n  sweeper:\n    params:\n      model.trust_remote_code: true,false\n",
     "hydra.sweeper.params.model.trust_remote_code='true,false': sweeps model.trust_remote_code, which runs code "
     "shipped with the checkpoint; not allowed from a preset"),
    ("hydra:\n  sweeper:\n    params:\n      +x: '{_target_:builtins.open}'\n",
     "hydra.sweeper.params.+x='{_target_:builtins.open}': sweeps x, which carries a _target_"),
    ("hydra:\n  sweeper:\n    _target_: builtins.exec\n",
     "hydra.sweeper._target_='builtins.exec': a sweeper outside the allowlist is not allowed; allowed: "
     "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"),
    ("hydra:\n  launcher:\n    _target_: hydra_plugins.evil.Launcher\n",
     "hydra.launcher._target_='hydra_plugins.evil.Launcher': a launcher outside the allowlist is not allowed"),
    ("hydra:\n  job:\n    env_set:\n      x:\n        _target_: os.system\n",
     "hydra.job.env_set.x._target_='os.system': a _target_ is not allowed here"),
])
def test_a_preset_cannot_set_what_executes(compose_with, body, message):
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        compose_with(body)
    assert str(e.value).startswith(message), str(e.value)


def test_a_preset_cannot_give_ray_a_runtime_env(compose_with):
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^hydra.launcher.init.runtime_env.pip=\['evil'\]: is a ray.init\(\) "
                                          r"argument that can install or run code"):
        compose_with("hydra:\n  launcher:\n    init:\n      runtime_env:\n        pip: [evil]\n", "hydra/launcher=ray")


@pytest.mark.parametrize("body,overrides", [
    # thread/ISA tuning for the jobs is what presets are for
    ("hydra:\n  launcher:\n    env:\n      OMP_NUM_THREADS: '2'\n      ONEDNN_MAX_CPU_ISA: AVX2\n", ()),
    ("hydra:\n  launcher:\n    init:\n      num_cpus: 2\n", ("hydra/launcher=ray",)),
    # the same values as the refused ones, typed on the command line
    ("", ("+hydra.launcher.env.LD_PRELOAD=/tmp/x.so", "model.trust_remote_code=true",
          "hydra.launcher.python=/usr/bin/python3")),
    ("", ("hydra/launcher=ray", "+hydra.launcher.init={runtime_env:{pip:[x]}}")),
    ("hydra:\n  launcher:\n    env:\n      LD_PRELOAD: /tmp/x.so\n", ("hydra.launcher.env.LD_PRELOAD=/tmp/x.so",)),
    # the project's own log file stays in the run folder
    ("hydra:\n  job_logging:\n    handlers:\n      file:\n        filename: ${hydra.runtime.output_dir}/x.log\n", ()),
])
def test_what_a_preset_may_set_and_the_command_line_may_add(compose_with, body, overrides):
    compose_with(body or "{}\n", *overrides)


def test_the_allowlist_is_one_table_extended_by_the_environment(monkeypatch):
    from orchestrator import allowlist
    from orchestrator.errors import ConfigError

    assert set(allowlist.TARGETS.values()) == {"launcher", "sweeper", "callback"}
    launcher = {"_target_": "my_pkg.Launcher", "opts": {"_target_": "my_pkg.Helper"}}
    with pytest.raises(ConfigError, match=r"^hydra.launcher._target_='my_pkg.Launcher': a launcher outside"):
        allowlist._check_targets(launcher, "hydra.launcher", "launcher")
    monkeypatch.setenv(allowlist.ENV, "my_pkg.Launcher,my_pkg.Helper")
    allowlist._check_targets(launcher, "hydra.launcher", "launcher")


def test_the_job_config_gets_the_configs_own_words(compose_with):
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model._target_='os.system': _target_ is not accepted in user config"):
        compose_with("{}\n", "+model._target_=os.system")
