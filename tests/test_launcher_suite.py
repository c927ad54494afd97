"""Hydra's own launcher conformance suite (hydra.test_utils.launcher_common_tests.LauncherTestSuite, the one Hydra's
plugins run) against the project's ``isolated`` launcher, on Hydra's trivial test app: a launcher that runs every job
in a fresh process must still return what Hydra's basic launcher returns (overrides, configs, job names and numbers,
output directories, resolvers, errors for bad keys)."""
from __future__ import annotations

import os

from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import LauncherTestSuite
from hydra.version import VersionBase, __compat_version__
from pytest import fixture, mark

from hydra_plugins.orchestrator_launcher.isolated_launcher import IsolatedLauncher


@fixture(autouse=True)
def _a_plain_process(monkeypatch, tmp_path):
    """Hydra's trivial app knows nothing of the orchestrator: no ORCH_* variable an earlier test of this process may
    have left (a sweep's parent run, a race socket) reaches its jobs, and they start from a folder that exists."""
    import os

    for key in [k for k in os.environ if k.startswith("ORCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@fixture(autouse=True)
def _hydras_default_version_base():
    """The suite is written for an app that gives no version_base (Hydra's 1.1 defaults: a job runs in its own
    folder, with its log file). Composing the project's config (version_base="1.3") earlier in the same process
    leaves that base in Hydra's process-wide singleton; the suite gets the default, the process gets its own back."""
    before = VersionBase.instance().version_base
    VersionBase.instance().setbase(__compat_version__)
    yield
    VersionBase.instance().version_base = before


def test_the_isolated_launcher_is_discovered_as_a_hydra_plugin() -> None:
    assert IsolatedLauncher.__name__ in [c.__name__ for c in Plugins.instance().discover(Launcher)]


@mark.parametrize("launcher_name, overrides", [("isolated", [])])
class TestIsolatedLauncher(LauncherTestSuite):
    pass


@mark.usefixtures("hydra_restore_singletons")
def test_every_job_runs_in_a_process_of_its_own(hydra_sweep_runner, tmpdir) -> None:
    """What the suite cannot see: the task ran elsewhere, once per job, and its return value came back."""
    sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                               task_function=lambda cfg: (os.getpid(), cfg.a), config_path="configs",
                               config_name="compose", overrides=["hydra/launcher=isolated", "+a=0,1,2"],
                               temp_dir=tmpdir)
    with sweep:
        returns = [r.return_value for r in sweep.returns[0]]
    assert [a for _, a in returns] == [0, 1, 2]
    pids = {pid for pid, _ in returns}
    assert len(pids) == 3 and os.getpid() not in pids
