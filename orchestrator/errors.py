"""Errors a user can act on. Each carries a one-line message that names the bad key/value and what is valid."""
from __future__ import annotations


class OrchestratorError(Exception):
    """A user-facing failure: the CLI prints ``error: <message>`` and nothing more, and exits ``exit_status``
    (2: input the user can fix)."""
    exit_status = 2


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
    """The run was stopped from outside (SIGTERM/SIGINT) or by runtime.timeout_s; it ends KILLED. Exit status
    128 + the signal's number for a signal (143 for SIGTERM, as a shell reports it), 1 for the timeout."""

    def __init__(self, message: str, signum: int = 0):
        super().__init__(message)
        self.exit_status = 128 + signum if signum else 1


class MeasuredFailure(OrchestratorError):
    """The run measured what it was asked to and the answer is a failure (e.g. a LoadGen scenario with no VALID
    rate under its latency bound): recorded in full, one line, exit status 1."""
    exit_status = 1


_ANSI = None
# lines that never name a cause: progress banners, traceback scaffolding
_NOT_A_CAUSE = ("Traceback (most recent call last)", "During handling of the above exception",
                "The above exception was the direct cause", "This is step", "Set the environment variable")


def first_line(error, limit: int = 300) -> str:
    """The one line of an exception (or text) a user should see: terminal colour codes stripped, and the first
    line that names a cause rather than a banner or traceback scaffolding. Empty text gives the type's name."""
    import re

    global _ANSI
    if _ANSI is None:
        _ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
    text = _ANSI.sub("", str(error))
    lines = [" ".join(ln.split()) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(_NOT_A_CAUSE)]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    line = lines[0]
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _yaml_error(error: BaseException) -> str:
    """A YAML syntax error in a config file, in one line: where (file, line, column), then what was wrong. PyYAML's
    own first line says only the construct it was parsing ("while parsing a flow sequence")."""
    import sys

    yaml = sys.modules.get("yaml")  # loaded by whoever parsed the file; nothing to say when no YAML was read
    if yaml is None or not isinstance(error, getattr(yaml, "MarkedYAMLError", ())):
        return ""
    mark = error.problem_mark or error.context_mark
    where = f"{mark.name} line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(error.problem or error.context or "invalid YAML").split())
    context = f" ({' '.join(error.context.split())})" if error.context and error.problem else ""
    return f"invalid YAML: {where}{what}{context}"


def describe(error: BaseException) -> str:
    """``Type: first line`` (just the message for an OrchestratorError, which is written for the user)."""
    yaml_error = _yaml_error(error)
    if yaml_error:
        return yaml_error
    line = first_line(error)
    if isinstance(error, OrchestratorError) or line.startswith(type(error).__name__):
        return line
    return f"{type(error).__name__}: {line}" if line != type(error).__name__ else line
