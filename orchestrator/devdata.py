"""Development data: presets that read ``${oc.env:ORCH_SHARED_DIR,../shared}`` name files that exist only in this
project's development and CI checkouts, not in the package. A missing path there is not a typo but data the user
never had, so the error says that and which key points the preset at their own."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

SHARED_ENV = "ORCH_SHARED_DIR"
# the presets' fallback when the variable is unset; relative paths resolve against the working directory
SHARED_DEFAULT = "../shared"


def shared_dir() -> Path:
    return Path(os.environ.get(SHARED_ENV) or SHARED_DEFAULT).expanduser().resolve()


def is_development_data(path: str | Path) -> bool:
    return Path(path).expanduser().resolve().is_relative_to(shared_dir())


def hint(path: str | Path, key: str, own: str) -> Optional[str]:
    """What to tell a user whose ``key`` points at a missing development-data path (None: not one of those)."""
    if not is_development_data(path):
        return None
    return (f"it is development data ({SHARED_DEFAULT} or ${SHARED_ENV}, not shipped with the package): point the "
            f"preset at your own with {key}=<{own}>")
