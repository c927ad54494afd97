"""The project patches private names of hydra-core 1.3.8 (orchestrator/hydra_patches.py): this fails when a Hydra
upgrade removes or reshapes one of them, and the patches refuse to install (one line) rather than silently lapse."""
from __future__ import annotations

import inspect

import pytest

from orchestrator import hydra_patches


def test_every_patched_private_name_exists_with_the_expected_parameters():
    import hydra

    assert hydra.__version__ == hydra_patches.HYDRA_VERSION, "hydra-core changed: re-check orchestrator/hydra_patches.py"
    assert hydra_patches.problems() == []
    from hydra._internal import utils
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    assert list(inspect.signature(utils.run_and_report).parameters) == ["func"]
    original = getattr(ConfigLoaderImpl.load_configuration, "__wrapped__", ConfigLoaderImpl.load_configuration)
    assert list(inspect.signature(original).parameters) == [
        "self", "config_name", "overrides", "run_mode", "from_shell", "validate_sweep_overrides"]
    # Hydra itself calls the patched names: the call sites the patches rely on are still there
    assert "run_and_report(" in inspect.getsource(utils._run_hydra)
    assert "run_and_report(" in inspect.getsource(utils._run_app)
    assert "load_configuration(" in inspect.getsource(ConfigLoaderImpl.load_sweep_config)


def test_install_is_idempotent_and_checks_every_composed_config():
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    hydra_patches.install_checks()
    first = ConfigLoaderImpl.load_configuration
    hydra_patches.install_checks()
    assert ConfigLoaderImpl.load_configuration is first and getattr(first, "_orch_patched", False)


def test_a_changed_hydra_is_refused_in_one_line(monkeypatch):
    from hydra._internal import utils

    def run_and_report(func, extra):  # what an upgrade reshaping the name would look like
        return func()

    monkeypatch.setattr(utils, "run_and_report", run_and_report)
    with pytest.raises(hydra_patches.HydraPatchError) as e:
        hydra_patches.install(lambda func: func())
    message = str(e.value)
    assert "\n" not in message
    assert message.endswith(f"(hydra._internal.utils.run_and_report(func, extra) instead of (func)); "
                            f"pip install hydra-core=={hydra_patches.HYDRA_VERSION}")


def test_another_hydra_version_that_still_fits_warns(monkeypatch):
    import hydra

    monkeypatch.setattr(hydra, "__version__", "1.3.9")
    with pytest.warns(UserWarning, match=r"^hydra-core 1.3.9 is not the tested 1.3.8"):
        hydra_patches.check_version()
