"""Shared fixtures: tiny models generated on the fly, small data files, composed configs, the shared data dir."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture()
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


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


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "ORCH_SHARED_DIR": str(SHARED), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
