"""Dataset loading through ``datasets.load_dataset``: local files and hub names take the same path."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DatasetError, first_line

# data shipped inside a package: builtin:<file> is orchestrator/data/<file>; builtin:<package>/<path> is a file
# of any installed package (a plugin's or task's own sample data)
BUILTIN_PREFIX = "builtin:"
PACKAGED_BUILDERS = ("csv", "json", "text", "parquet", "arrow")


def builtin_path(name: str) -> Path:
    import importlib.util

    package, _, rest = name.partition("/")
    if rest and package.isidentifier():
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return Path(str(resources.files(package) / rest))
    return Path(str(resources.files("orchestrator") / "data" / name))


def _resolve(files: Any, key: str) -> Any:
    if files is None:
        return None
    if isinstance(files, str):
        path = builtin_path(files[len(BUILTIN_PREFIX):]) if files.startswith(BUILTIN_PREFIX) else Path(files)
        if not path.exists():
            raise DatasetError(f"{key}: file not found: {files} (resolved to {path.resolve()})")
        return str(path)
    if isinstance(files, (list, tuple)):
        return [_resolve(f, key) for f in files]
    if isinstance(files, dict):
        return {k: _resolve(v, key) for k, v in files.items()}
    raise DatasetError(f"{key}={files!r}: expected a path, a list of paths or a split->path mapping")


def load_calibration(cfg):
    """``dataset.calibration_split`` of ``calibration_data_files`` (else of ``data_files``), its first
    ``calibration_samples`` rows; a missing file is named by the key that set it."""
    import dataclasses

    own_files = bool(cfg.calibration_data_files)
    calibration = dataclasses.replace(cfg, split=cfg.calibration_split, max_samples=cfg.calibration_samples,
                                      data_files=cfg.calibration_data_files if own_files else cfg.data_files)
    return load(calibration, files_key="dataset.calibration_data_files" if own_files else "dataset.data_files")


def load(cfg, seed: int = 0, files_key: str = "dataset.data_files"):
    """Load the configured split, apply ``max_samples``; one-line DatasetError on any user-fixable problem."""
    import datasets

    kwargs = dict(cfg.load_kwargs or {})
    data_files = _resolve(cfg.data_files, files_key)
    if (cfg.path in PACKAGED_BUILDERS or cfg.path in LOCAL_FORMATS) and data_files is None:
        raise DatasetError(f"dataset.path={cfg.path!r} reads local files: set dataset.data_files")
    try:
        if cfg.path in LOCAL_FORMATS:
            ds = LOCAL_FORMATS[cfg.path](data_files, cfg.split, **kwargs)
        else:
            ds = datasets.load_dataset(cfg.path, cfg.name, data_files=data_files, split=cfg.split, **kwargs)
    except (FileNotFoundError, ValueError, UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ or e
        first = first_line(cause)
        if "corresponds to no data" in first:  # a file with a header and no rows
            raise DatasetError(f"dataset {cfg.path!r} split {cfg.split!r} has 0 rows (after max_samples/filters)") from e
        raise DatasetError(f"dataset {cfg.path!r} (files {cfg.data_files!r}, split {cfg.split!r}) could not be "
                           f"loaded: {type(cause).__name__}: {first}") from e
    except ConnectionError as e:
        raise DatasetError(f"dataset {cfg.path!r} needs the Hugging Face Hub, which is unreachable here: {e}") from e
    if cfg.max_samples is not None and cfg.max_samples < len(ds):
        ds = ds.select(range(cfg.max_samples))
    if len(ds) == 0:
        raise DatasetError(f"dataset {cfg.path!r} split {cfg.split!r} has 0 rows (after max_samples/filters)")
    return ds


# -- local file formats the `datasets` packaged builders do not flatten for us ------------------------------------
# ``dataset.path: squad_json`` reads SQuAD's ``{"data": [articles]}`` files through the json builder
# (``field: data``) and flattens paragraphs/qas into the hub ``squad`` columns id, title, context, question,
# answers{text, answer_start}. ``dataset.path: conll`` reads CoNLL-style files (token ... tag per line, blank line
# between sentences, ``-DOCSTART-`` lines skipped; the first column is the token, the last the tag) into the hub
# columns id, tokens, ner_tags (tags kept as strings). Both keep ``data_files`` semantics: a path, a list of paths,
# or a split->path mapping from which ``dataset.split`` is taken.


def _split_files(data_files: Any, split: str) -> list:
    if isinstance(data_files, dict):
        if split not in data_files:
            raise DatasetError(f"dataset.split={split!r} is not in dataset.data_files; valid: {', '.join(data_files)}")
        data_files = data_files[split]
    return [data_files] if isinstance(data_files, str) else list(data_files)


def _flatten_squad(batch):
    out = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for title, paragraphs in zip(batch["title"], batch["paragraphs"]):
        for paragraph in paragraphs:
            for qa in paragraph["qas"]:
                out["id"].append(str(qa["id"]))
                out["title"].append(title)
                out["context"].append(paragraph["context"])
                out["question"].append(qa["question"])
                answers = qa.get("answers") or []
                out["answers"].append({"text": [a["text"] for a in answers],
                                       "answer_start": [int(a["answer_start"]) for a in answers]})
    return out


def load_squad_json(data_files: Any, split: str, **kwargs):
    import datasets

    files = _split_files(data_files, split)
    articles = datasets.load_dataset("json", data_files={split: files}, field="data", split=split, **kwargs)
    missing = [c for c in ("title", "paragraphs") if c not in articles.column_names]
    if missing:
        raise DatasetError(f"dataset.path='squad_json': {files[0]} is not SQuAD's {{\"data\": [articles]}} format "
                           f"(articles lack {', '.join(missing)}; columns found: {', '.join(articles.column_names)})")
    return articles.map(_flatten_squad, batched=True, remove_columns=articles.column_names)


def read_conll(path: str):
    """(tokens, tags) per sentence of a CoNLL-style file."""
    tokens, tags = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                if tokens:
                    yield tokens, tags
                tokens, tags = [], []
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if parts[0] == "-DOCSTART-":
                continue
            if len(parts) < 2:
                raise DatasetError(f"dataset.path='conll': {path} line {n} has one column ({line!r}); "
                                   "expected token<TAB>tag")
            if not parts[-1].strip():
                raise DatasetError(f"dataset.path='conll': {path} line {n} has a blank tag ({line!r}); "
                                   "expected token<TAB>tag")
            tokens.append(parts[0])
            tags.append(parts[-1].strip())
    if tokens:
        yield tokens, tags


def load_conll(data_files: Any, split: str, **kwargs):
    import datasets

    if kwargs:
        raise DatasetError(f"dataset.load_kwargs: not used by dataset.path='conll' (got {', '.join(kwargs)})")
    rows = {"id": [], "tokens": [], "ner_tags": []}
    for path in _split_files(data_files, split):
        for tokens, tags in read_conll(path):
            rows["id"].append(str(len(rows["id"])))
            rows["tokens"].append(tokens)
            rows["ner_tags"].append(tags)
    features = datasets.Features({"id": datasets.Value("string"),
                                  "tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict(rows, features=features, split=split)


LOCAL_FORMATS = {"squad_json": load_squad_json, "conll": load_conll}
