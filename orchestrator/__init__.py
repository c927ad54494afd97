"""CPU inference orchestrator: compose a model, dataset, precision and optimization stack; measure; track.

Importing this package loads no optional plugin dependency (those load only when their plugin runs).
"""
__version__ = "0.1.0"


def run(cfg):
    """Run one evaluation from a composed config (DictConfig or RunConfig) and return its results."""
    from .runner import run as _run

    return _run(cfg)
