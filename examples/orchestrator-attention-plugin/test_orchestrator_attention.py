"""The conformance test of an out-of-tree plugin: orchestrator.plugin_api.check_plugin on the class, then on a tiny
generated BERT (no download) with a padded batch, as the runner would call it."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

from orchestrator.plugin_api import check_plugin
from orchestrator_attention import AttentionPlugin


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def padded_batch() -> dict:
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_the_class_keeps_the_contract():
    check_plugin(AttentionPlugin)


def test_check_apply_and_what_it_reports_keep_the_contract(tmp_path):
    check_plugin(AttentionPlugin, tiny_bert(), padded_batch(), run_dir=tmp_path)
