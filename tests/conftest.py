"""Shared fixtures: tiny models generated on the fly, small data files, composed configs, the shared data dir."""
from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import pytest

# One OpenMP thread per test process unless the caller says otherwise (before anything imports torch; the CLI and job
# processes the tests start inherit it). The suite runs two workers on two cores, and each worker's run and the job
# processes it starts would otherwise take a thread per core: more busy threads than cores, and libgomp's threads
# spin-wait for each other between parallel regions (tests/test_scenarios.py). Measured on the 2-core AMD EPYC: the
# full suite 14:21 against 16:31-16:46, CPU time -18 %. The tests assert behaviour, not speed; those about threads
# set their own count (test_performance, test_race's waiting-job check, test_engines' contexts).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ORCH_SHARED_DIR", REPO.parent / "shared")).resolve()
CONF_DIR = str(REPO / "conf")

WORDS = ("the a cat dog sat on mat ran fast slow good bad movie film great awful happy sad man woman "
         "plays guitar piano eats food red blue car drives road is was very not").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def needs_cpu(capability: str):
    """Skip where this CPU (or a ONEDNN_MAX_CPU_ISA cap) lacks a capability; the reason names the CPU."""
    from orchestrator import cpu

    return pytest.mark.skipif(not cpu.has(capability), reason=f"this CPU has no {capability} "
                              f"({cpu.CAPABILITIES[capability][1]}): {cpu.describe()}")


needs_bf16 = needs_cpu("bf16")


def needs_shared(*parts: str):
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (../shared is a development/CI folder)")


def make_tokenizer(dest: Path):
    from transformers import BertTokenizer

    # BertTokenizerFast(vocab_file=...) ignores the file in transformers 5.x; BertTokenizer(vocab=...) does not
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    tok.save_pretrained(dest)
    return tok


def make_tiny_model(dest: Path, head: str = "base", num_labels: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                              BertForTokenClassification, BertModel)

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    if head == "classification":
        cfg.id2label = {i: name for i, name in enumerate(["negative", "positive", "neutral"][:num_labels])}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    cls = {"base": BertModel, "classification": BertForSequenceClassification,
           "qa": BertForQuestionAnswering, "token": BertForTokenClassification}[head]
    model = cls(cfg).eval()
    model.save_pretrained(dest)
    make_tokenizer(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-encoder"), "base")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-classifier"), "classification")


@pytest.fixture(scope="session")
def tiny_qa_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qa"), "qa")


@pytest.fixture(scope="session")
def tiny_ner(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-ner"), "token", num_labels=3)


def write_tsv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def sts_file(tmp_path_factory) -> Path:
    import random

    rnd = random.Random(0)
    rows = []
    for i in range(24):
        a = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12)))
        b = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12)))
        rows.append((a, b, round(rnd.uniform(0, 5), 1)))
    return write_tsv(tmp_path_factory.mktemp("data") / "sts.tsv", ("sentence1", "sentence2", "score"), rows)


@pytest.fixture(scope="session")
def cls_file(tmp_path_factory) -> Path:
    import random

    rnd = random.Random(1)
    rows = [(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 20))), rnd.randint(0, 1)) for _ in range(40)]
    return write_tsv(tmp_path_factory.mktemp("data") / "cls.tsv", ("text", "label"), rows)


def write_squad(path: Path, paragraphs) -> Path:
    """paragraphs: [(context, [(id, question, answer_text)])] -> a SQuAD {"data": [...]} file."""
    paras = [{"context": c, "qas": [{"id": i, "question": q,
                                     "answers": [{"text": a, "answer_start": c.find(a)}]} for i, q, a in qas]}
             for c, qas in paragraphs]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paras}]}))
    return path


# -- MLflow -------------------------------------------------------------------------------------------------------
def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


_EMPTY_STORE: List[Path] = []


def mlflow_store(path: Path) -> str:
    """The URI of a ready, empty MLflow sqlite store at ``path``: a copy of one MLflow created once per test process.
    A fresh store costs MLflow seconds of schema migrations (an fsync per step) in whichever process meets it first;
    tests about creating a store (the first-use race, MLflow's notices on stderr) use a plain ``sqlite_uri``."""
    if not _EMPTY_STORE:
        import tempfile

        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="orch-empty-store-")) / "mlflow.db"
        MlflowClient(sqlite_uri(template)).search_experiments()
        _EMPTY_STORE.append(template)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE[0], path)
    return sqlite_uri(path)


@pytest.fixture()
def tracking_uri(tmp_path) -> str:
    return mlflow_store(tmp_path / "mlflow.db")


def runs_of(uri: str, experiment: str = "orchestrator"):
    """(client, every run of the experiment); no runs while the experiment does not exist."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id], max_results=1000) if exp else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what: str, timeout: float = 240, every: float = 0.5):
    """pred()'s first truthy value, polled; the test fails naming ``what`` when none comes within ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what} ({timeout:.0f} s)")


def measuring(uri: str, job: Optional[str] = None):
    """The RUNNING run (of sweep job ``job``) once its accuracy pass is logged, else None: a run in its timing pass,
    where a test stops it."""
    try:
        _, runs = runs_of(uri)
    except Exception:  # the store is being created or written
        return None
    for r in runs:
        if r.info.status == "RUNNING" and "spearman" in r.data.metrics and \
                (job is None or r.data.tags.get("job_num") == job):
            return r
    return None


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, artifact folder) in a process group of its own, so
    that killing it reaches the workers that serve the port too. ``kill()`` (-9) is also how a test crashes it;
    ``start()`` again serves the same store on the same port."""

    def __init__(self, root: Path, port: Optional[int] = None):
        self.root, self.port = Path(root), port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = sqlite_uri(self.root / "server.db")  # readable directly while the server is down
        self.artifacts = self.root / "server-artifacts"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        if not (self.root / "server.db").exists():
            mlflow_store(self.root / "server.db")  # migrated already: the server answers sooner
        log_path = self.root / "server.log"
        with open(log_path, "a") as log:
            self.proc = start_process(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", self.store, "--artifacts-destination", str(self.artifacts), "--workers", "1"],
                cwd=self.root, stdout=log,
                # no GenAI job runner: two more processes (huey consumers) that import MLflow at every start
                # and poll for the server's lifetime, for jobs no test submits
                env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {log_path.read_text()[-2000:]}")
            try:
                return urllib.request.urlopen(f"{self.url}/health", timeout=2)
            except OSError:
                return None

        try:
            wait_for(up, "the mlflow server to answer /health", timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc)

    stop = kill  # nothing is read from a test's server after it: no graceful shutdown to wait for (it takes seconds)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """One tracking server for the tests that log to a live one (each in an experiment of its own): starting one
    costs tens of seconds on a busy machine. Tests that crash or restart a server start their own."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.kill()


# -- child processes: the CLI and servers ---------------------------------------------------------------------------
# Every process a test starts goes through start_process: its own process group (a kill reaches what it started),
# SIGINT at its default action, and a kill of whatever is left when the test (or, for fixtures, the session) ends.
_STARTED: List[subprocess.Popen] = []


def _default_sigint() -> None:  # in the child, before exec
    # a suite started from a script (`nohup ... &`, `setsid nohup ...`) runs with SIGINT ignored; a child inherits
    # SIG_IGN, and Python raises KeyboardInterrupt only when it starts with SIGINT at its default
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # a suite killed from outside (`timeout`, CI's end) runs no fixture teardown: the child, in a session of its
    # own, would outlive it (a session's mlflow server was left serving). SIGTERM when the test process dies
    # lets it end what it started itself (Linux only; elsewhere nothing changes)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_process(cmd: List[str], *, cwd: Path, env: Optional[dict] = None, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)
    _STARTED.append(proc)
    return proc


def _signal_group(pgid: int, sig: int) -> None:
    if pgid == os.getpgid(0):  # never the group pytest itself runs in
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and every process it started, including those in sessions of their own
    (the isolated launcher's job processes, a server's workers), then reap it."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)  # before their parent dies
    except psutil.NoSuchProcess:
        descendants = []
    _signal_group(proc.pid, signal.SIGKILL)
    for p in descendants:
        try:
            if os.getpgid(p.pid) == p.pid:
                _signal_group(p.pid, signal.SIGKILL)
            p.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture()
def ctrl_c_raises():
    """SIGINT at Python's own handler for the test, as the CLI and job processes set it (interrupts.restore_sigint):
    a suite started in the background (`nohup pytest &`, a CI script) runs with SIGINT ignored, and a test that sends
    its own process a Ctrl-C would then see nothing happen."""
    from orchestrator.interrupts import restore_sigint

    before = signal.getsignal(signal.SIGINT)
    restore_sigint()
    yield
    signal.signal(signal.SIGINT, before)


def descendants_running(pid: int, needle: str) -> list:
    """The live descendants of ``pid`` whose command line holds ``needle``. A descendant that ended meanwhile (a
    zombie its parent has not reaped yet: a job just done, a ``git`` call) is skipped, not an error."""
    import psutil

    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if needle in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    started = len(_STARTED)
    yield
    for proc in _STARTED[started:]:
        if proc.poll() is None:
            kill_tree(proc)
    del _STARTED[started:]


def pytest_configure(config):
    # pytest-timeout (pyproject) ends a hung test by ending its xdist worker; xdist would then hand the test's whole
    # file to a new worker, which hangs again, up to 4 times per worker (--dist loadfile requeues the file): one
    # failure with its stacks is the answer, not an hour of retries. An explicit --max-worker-restart still wins.
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "maxworkerrestart", "") is None:
        config.option.maxworkerrestart = "0"
    # xdist hands out files in the order of the workers' collection (below) instead of most tests first: a file of
    # a few long end-to-end tests queued last kept one worker busy a minute after the other ran out of work
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "loadscopereorder", None):
        config.option.loadscopereorder = False


# Test files by their seconds in a full run (the README's command, AMD EPYC 2 cores, 2026-12-05, late): the sum of each
# file's tests; the two reference files since their batches are length-sorted), the heaviest queued first so the
# two workers finish together (longest first is within 4/3 of the best split); a file not listed counts 0.5 s per
# test. Only the order changes: refresh it when a file's share moves (--durations, or --junitxml per file).
FILE_SECONDS = {"test_race.py": 197, "test_tracking_faults.py": 177, "test_distributed.py": 132,
                "test_engines_reference.py": 127, "test_trust.py": 112, "test_engines.py": 79, "test_cli.py": 75,
                "test_launchers.py": 51, "test_bad_data.py": 51, "test_reliability.py": 48, "test_scenarios.py": 38,
                "test_reference.py": 37, "test_newcomer.py": 31, "test_run.py": 24, "test_plugins.py": 22,
                "test_hardening2.py": 21, "test_bad_input.py": 21, "test_stress.py": 21,
                "test_question_answering.py": 18, "test_postgres.py": 17, "test_records.py": 15,
                "test_extension.py": 15, "test_performance.py": 14, "test_configs.py": 14, "test_weights.py": 11}


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # the order matters to xdist's queue only; a plain run keeps its own
        return
    first_seen: Dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item.path.name, len(first_seen))
    counts = collections.Counter(item.path.name for item in items)
    items.sort(key=lambda it: (-FILE_SECONDS.get(it.path.name, 0.5 * counts[it.path.name]), first_seen[it.path.name]))


def pytest_sessionfinish(session, exitstatus):  # processes that session/module fixtures started
    for proc in _STARTED:
        if proc.poll() is None:
            kill_tree(proc)
    for template in _EMPTY_STORE:
        shutil.rmtree(template.parent, ignore_errors=True)


TOOLS = ("orchestrator", "orchestrator-import", "orchestrator-report")


def cli_command(tool: str, args) -> List[str]:
    assert tool in TOOLS, tool
    if tool == "orchestrator":
        return [sys.executable, "-m", "orchestrator", *args]
    # the console scripts pip installed beside this interpreter
    exe = shutil.which(tool) or str(Path(sys.executable).with_name(tool))
    return [exe, *args]


def cli_env(env: Optional[dict] = None) -> dict:
    full = {**os.environ, "ORCH_SHARED_DIR": str(SHARED), **(env or {})}
    full.pop("HYDRA_FULL_ERROR", None)  # tests read the one error line, not a traceback
    return full


def start_cli(*args: str, cwd: Path, env: Optional[dict] = None, tool: str = "orchestrator", stdout=subprocess.PIPE,
              stderr=subprocess.PIPE) -> subprocess.Popen:
    """The CLI started, not awaited (for tests that signal it or watch it work); killed with everything it started
    if it is still running when the test ends."""
    return start_process(cli_command(tool, args), cwd=cwd, env=cli_env(env), stdout=stdout, stderr=stderr)


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a started CLI; past ``timeout`` it is killed with everything it started and the test fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        try:
            out, err = proc.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError):
            out, err = "", ""
        pytest.fail(f"{' '.join(map(str, proc.args))} did not end within {timeout:.0f} s (killed with its "
                    f"process group); stderr ends: {(err or '')[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args: str, cwd: Path, env: Optional[dict] = None, timeout: float = 600,
            tool: str = "orchestrator") -> subprocess.CompletedProcess:
    """``orchestrator ARGS`` (or ``orchestrator-import``/``-report``) as a user runs it, in ``cwd``."""
    return finish(start_cli(*args, cwd=cwd, env=env, tool=tool), timeout)


def run_tool(main: Callable[[List[str]], int], *args: str) -> SimpleNamespace:
    """``orchestrator-import``/``-report`` in this process (``main`` is the console script's function): for a
    second call whose subject is the store, not the tool's start-up (each tool is run through its console script
    elsewhere). stdout and stderr as the CLI's would be."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


# -- configs -------------------------------------------------------------------------------------------------------
@pytest.fixture()
def compose(tmp_path, monkeypatch):
    """Compose conf/ with overrides, as the CLI would (runs happen in tmp_path)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.config import register_configs

    register_configs()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORCH_SHARED_DIR", str(SHARED))

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def tiny_sts_overrides(model: Path, data: Path, uri: str):
    return [f"model.name_or_path={model}", "dataset.path=csv", f"dataset.data_files={data}",
            "runtime=quick", f"tracking.uri={uri}"]




@pytest.fixture()
def cli_error(compose):
    """The ``error:`` line and exit status the CLI gives for a config it refuses, found in process: Hydra composes
    conf/ with the overrides as the CLI does, the project validates, ``orchestrator.cli`` words it. For messages
    only; tests/test_configs.py keeps CLI runs of the same paths end to end."""
    from orchestrator.cli import exit_code, one_line
    from orchestrator.config import validate

    def _error(*overrides: str) -> "tuple[str, int]":
        try:
            validate(compose(*overrides))
        except Exception as e:
            return f"error: {one_line(e)}", exit_code(e)
        pytest.fail(f"{' '.join(overrides)} composed and validated")

    return _error
