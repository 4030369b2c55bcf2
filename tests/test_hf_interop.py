"""Cross-check against transformers: the same logits and greedy tokens both ways, for every family
athanor reads (Llama with and without RoPE scaling, Mistral, Qwen2, Qwen3) (optional group)."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel
from athanor.serve.engine import Engine
from athanor.serve.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.ref

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {
    "llama-gqa-tied": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mha-untied-bias": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=False,
                                  attention_bias=True),
    "llama3-rope-scaling": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True,
                                rope_theta=500_000.0, rope_scaling=LLAMA3_ROPE),
    "llama-linear-rope": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False,
                              rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # Mistral: Llama's math (with transformers' default sliding_window 4096, longer than the context).
    "mistral-gqa-untied": dict(model_type="mistral", num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2-gqa-untied": dict(model_type="qwen2", num_key_value_heads=1, tie_word_embeddings=False,
                             rope_theta=1_000_000.0),
    "qwen2-tied": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen3's head_dim is its own setting (128 in its configs), not hidden_size / heads.
    "qwen3-tied-wide-heads": dict(model_type="qwen3", num_key_value_heads=2, tie_word_embeddings=True,
                                  head_dim=32, rope_theta=1_000_000.0),
    "qwen3-untied-bias": dict(model_type="qwen3", num_key_value_heads=4, tie_word_embeddings=False,
                              attention_bias=True),
}
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def _randomize_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)


def _compare(ours: LlamaModel, theirs) -> None:
    """Logits within 1e-4 over 100 positions (past the llama3 case's original context of 32), and the
    same greedy continuation from athanor's engine as from transformers' generate()."""
    ids = torch.randint(0, 512, (2, 100))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4
    prompt = ids[0, :12]
    expected = theirs.generate(prompt[None], max_new_tokens=40, do_sample=False, min_new_tokens=40,
                               attention_mask=torch.ones(1, 12, dtype=torch.long))[0, 12:].tolist()
    got = Engine(ours, max_batch=1).generate([prompt.tolist()], SamplingParams(max_tokens=40, temperature=0))
    assert got[0].output_ids == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_athanor_export_loads_in_transformers(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = LlamaModel(tiny_model_config(**CASES[case])).eval()
    _randomize_biases(ours)
    save_pretrained(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[ours.config.model_type]
    assert type(theirs).__name__ == expected
    _compare(ours, theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_checkpoint_loads_in_athanor(case: str, tmp_path: Path) -> None:
    kw = dict(CASES[case])
    torch.manual_seed(1)
    model_type = kw.pop("model_type")
    rope = {"rope_type": "default", **(kw.pop("rope_scaling", None) or {}), "rope_theta": kw.pop("rope_theta", 1e4)}
    hf_cfg = getattr(transformers, CONFIG_CLASSES[model_type])(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_parameters=rope, **kw)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    _randomize_biases(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == rope["rope_theta"]
    assert (ours.config.rope_scaling or {}).get("rope_type", "default") == rope["rope_type"]
    _compare(ours, theirs)


def test_sharded_bf16_checkpoint_loads_as_stored(tmp_path: Path) -> None:
    torch.manual_seed(2)
    hf_cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    theirs.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    bf16 = load_pretrained(tmp_path, dtype=None)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for name, p in theirs.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(bf16.state_dict()[name], p), name
    f32 = load_pretrained(tmp_path)
    assert torch.equal(f32.model.embed_tokens.weight, theirs.model.embed_tokens.weight.float())
