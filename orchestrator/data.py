"""Dataset loading through ``datasets.load_dataset``: local files and hub names take the same path."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DatasetError

BUILTIN_PREFIX = "builtin:"  # data shipped inside this package (orchestrator/data/)
PACKAGED_BUILDERS = ("csv", "json", "text", "parquet", "arrow")


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("orchestrator") / "data" / name))


def _resolve(files: Any) -> Any:
    if files is None:
        return None
    if isinstance(files, str):
        path = builtin_path(files[len(BUILTIN_PREFIX):]) if files.startswith(BUILTIN_PREFIX) else Path(files)
        if not path.exists():
            raise DatasetError(f"dataset.data_files: file not found: {files} (resolved to {path.resolve()})")
        return str(path)
    if isinstance(files, (list, tuple)):
        return [_resolve(f) for f in files]
    if isinstance(files, dict):
        return {k: _resolve(v) for k, v in files.items()}
    raise DatasetError(f"dataset.data_files={files!r}: expected a path, a list of paths or a split->path mapping")


def load(cfg, seed: int = 0):
    """Load the configured split, apply ``max_samples``; one-line DatasetError on any user-fixable problem."""
    import datasets

    kwargs = dict(cfg.load_kwargs or {})
    data_files = _resolve(cfg.data_files)
    if cfg.path in PACKAGED_BUILDERS and data_files is None:
        raise DatasetError(f"dataset.path={cfg.path!r} reads local files: set dataset.data_files")
    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, data_files=data_files, split=cfg.split, **kwargs)
    except (FileNotFoundError, ValueError, UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DatasetError(f"dataset {cfg.path!r} (files {cfg.data_files!r}, split {cfg.split!r}) could not be "
                           f"loaded: {type(cause).__name__}: {first}") from e
    except ConnectionError as e:
        raise DatasetError(f"dataset {cfg.path!r} needs the Hugging Face Hub, which is unreachable here: {e}") from e
    if cfg.max_samples is not None and cfg.max_samples < len(ds):
        ds = ds.select(range(cfg.max_samples))
    if len(ds) == 0:
        raise DatasetError(f"dataset {cfg.path!r} split {cfg.split!r} has 0 rows (after max_samples/filters)")
    return ds
