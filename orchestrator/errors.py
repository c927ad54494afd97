"""Errors a user can act on. Each carries a one-line message that names the bad key/value and what is valid."""
from __future__ import annotations


class OrchestratorError(Exception):
    """A user-facing failure: the CLI prints ``error: <message>`` and nothing more, and exits 2."""


class ConfigError(OrchestratorError):
    """A composed config value is invalid (range, combination, unknown name)."""


class PluginUnavailable(OrchestratorError):
    """A plugin cannot run here (missing package, wrong version, unsupported model)."""

    def __init__(self, plugin: str, reason: str):
        super().__init__(f"optimization plugin '{plugin}' is unavailable: {reason}")
        self.plugin = plugin
        self.reason = reason


class ModelLoadError(OrchestratorError):
    pass


class DatasetError(OrchestratorError):
    pass


class RunInterrupted(OrchestratorError):
    """The run was stopped from outside (SIGTERM/SIGINT) or by runtime.timeout_s; it ends KILLED."""
