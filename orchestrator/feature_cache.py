"""Tokenize once per process: features keyed by what produced them, reused by later runs of a sweep.

A sequential multirun (Hydra's basic launcher) runs every job in one process; jobs that differ only in stack,
precision or batching tokenize the same rows the same way, so only the first pays for it. The key is the
dataset's content fingerprint (``datasets`` computes it from the files and every ``select``), the tokenizer's
identity and vocabulary size, the task, its options and columns, and ``runtime.max_length``; batching options
are not part of it because batches are built from features afterwards. Features are never mutated after
``featurize``, so sharing them is safe. Bounded, oldest evicted first.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Tuple

MAX_ENTRIES = 4
_cache: "OrderedDict[Tuple, Any]" = OrderedDict()


def key(task, dataset) -> Tuple | None:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint:
        return None
    tok = task.tokenizer
    return (task.name, fingerprint, type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok),
            getattr(tok, "padding_side", ""), getattr(tok, "truncation_side", ""), task.runtime.max_length,
            repr(task.options), repr(sorted(task.columns.items())))


def featurize(task, dataset) -> Tuple[Any, bool]:
    """(features, whether they came from the cache)."""
    k = key(task, dataset)
    if k is not None and k in _cache:
        _cache.move_to_end(k)
        return _cache[k], True
    features = task.featurize(dataset)
    if k is not None:
        _cache[k] = features
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    return features, False


def clear() -> None:
    _cache.clear()
