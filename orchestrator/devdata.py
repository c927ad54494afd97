"""Development data: presets that read ``${oc.env:ORCH_SHARED_DIR,../shared}`` name files that exist only in this
project's development and CI checkouts, not in the package. A missing path there is not a typo but data the user
never had, so the error says that and which key points the preset at their own."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List

SHARED_ENV = "ORCH_SHARED_DIR"
# the presets' fallback when the variable is unset; relative paths resolve against the working directory
SHARED_DEFAULT = "../shared"


def shared_dir() -> Path:
    return Path(os.environ.get(SHARED_ENV) or SHARED_DEFAULT).expanduser().resolve()


def is_development_data(path: str | Path) -> bool:
    return Path(path).expanduser().resolve().is_relative_to(shared_dir())


# what to point each key at instead
OWN = {"model.name_or_path": "a local model directory or a Hub id", "dataset.data_files": "your file",
       "dataset.calibration_data_files": "your file"}


def _paths(value: Any) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    return []


def check_present(values: Dict[str, Any]) -> None:
    """Before anything loads: every development-data path the run would read (key -> configured value) exists,
    else one line naming all that are missing and the keys that point a preset at one's own data."""
    from .errors import ConfigError

    missing = [(key, path) for key, value in values.items() for path in _paths(value)
               if is_development_data(path) and not Path(path).expanduser().exists()]
    if missing:
        keys = list(dict.fromkeys(key for key, _ in missing))
        raise ConfigError(
            "development data not found (" + ", ".join(f"{k}={p}" for k, p in missing)
            + f"): {SHARED_DEFAULT} or ${SHARED_ENV} holds this project's development data, not shipped with the "
            "package; point the preset at your own with " + " ".join(f"{k}=<{OWN.get(k, 'your path')}>" for k in keys))
