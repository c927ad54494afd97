"""Tasks, one module each; looked up by name through the ``orchestrator.tasks`` entry-point group."""
from .base import Features, Task

__all__ = ["Features", "Task"]
