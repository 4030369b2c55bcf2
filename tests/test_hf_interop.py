"""Cross-check against transformers: the same logits both ways, Llama and Qwen2 style (optional group)."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.ref

CASES = {
    "llama-gqa-tied": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mha-untied-bias": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=False,
                                  attention_bias=True),
    "qwen2-gqa-untied": dict(model_type="qwen2", num_key_value_heads=1, tie_word_embeddings=False,
                             rope_theta=1_000_000.0),
    "qwen2-tied": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
}


def _randomize_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_athanor_export_loads_in_transformers(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = LlamaModel(tiny_model_config(**CASES[case])).eval()
    _randomize_biases(ours)
    save_pretrained(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[ours.config.model_type]
    assert type(theirs).__name__ == expected
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_checkpoint_loads_in_athanor(case: str, tmp_path: Path) -> None:
    kw = CASES[case]
    torch.manual_seed(1)
    cls = transformers.Qwen2Config if kw["model_type"] == "qwen2" else transformers.LlamaConfig
    extra = {"attention_bias": kw.get("attention_bias", False)} if kw["model_type"] == "llama" else {}
    hf_cfg = cls(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=kw["num_key_value_heads"], max_position_embeddings=128,
                 tie_word_embeddings=kw["tie_word_embeddings"], rope_theta=kw.get("rope_theta", 10000.0),
                 rms_norm_eps=1e-6, **extra)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    _randomize_biases(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == kw.get("rope_theta", 10000.0)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4
