"""Built-in optimization plugins, one module each, registered through the ``orchestrator.plugins`` entry points.

Nothing here imports an optional package at module import time.
"""
