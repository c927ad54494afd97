"""Hydra launcher plugins shipped by cpu-inference-orchestrator (discovered through the ``hydra_plugins``
namespace package): ``hydra/launcher=isolated``, one fresh Python process per job, one job at a time."""
