"""LoRA: starts at the base model, trains only adapters, saves/loads/merges to the same function."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model_config

from athanor.cli import main
from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel
from athanor.model.lora import LoraConfig, LoraInfo, LoraLinear, apply_lora, load_adapter, merge_lora, save_adapter

X = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def trained_lora(config: LoraConfig) -> tuple[LlamaModel, LlamaModel, LoraInfo]:
    """(the base model, a copy with adapters whose B is no longer zero, its LoraInfo)."""
    torch.manual_seed(0)
    base = LlamaModel(tiny_model_config())
    model = LlamaModel(tiny_model_config())
    model.load_state_dict(base.state_dict())
    info = apply_lora(model, config, seed=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0, 0.05)
    return base, model, info


def test_starts_at_the_base_model_and_trains_only_adapters():
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config())
    before = model(X)
    info = apply_lora(model, LoraConfig(r=4, alpha=8))
    torch.testing.assert_close(model(X), before)  # B = 0
    assert len(info.targets) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; never lm_head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    d, inter, kv = 64, 128, 2 * 16
    per_layer = 4 * (2 * d + d + d) + 4 * (d + kv) * 2 + 4 * (d + inter) * 3
    assert info.trainable == 2 * per_layer
    model(X).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_targets_and_rslora_scaling():
    model = LlamaModel(tiny_model_config())
    info = apply_lora(model, LoraConfig(r=16, alpha=8, rslora=True, target_modules=["q_proj", "v_proj"]))
    assert sorted({t.split(".")[-1] for t in info.targets}) == ["q_proj", "v_proj"]
    assert model.model.layers[0].self_attn.q_proj.scaling == 8 / 4  # alpha / sqrt(r)
    assert LoraConfig(r=16, alpha=8).scaling == 0.5


def test_save_load_and_merge_keep_the_function(tmp_path):
    base, model, info = trained_lora(LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj", "o_proj"]))
    expected = model(X)
    assert not torch.allclose(expected, base(X))
    save_adapter(model, info, tmp_path / "adapter", base="somewhere")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["o_proj", "q_proj", "up_proj"]
    fresh = LlamaModel(tiny_model_config())
    fresh.load_state_dict(base.state_dict())
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(X), expected)
    merged = merge_lora(fresh)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(X), expected, rtol=1e-5, atol=1e-5)


def test_cli_merge(tmp_path, tokenizer_dir):
    base, model, info = trained_lora(LoraConfig(r=2, alpha=4))
    save_pretrained(base, tmp_path / "base")
    save_adapter(model, info, tmp_path / "adapter")
    assert main(["lora", "merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(load_pretrained(tmp_path / "merged")(X), model(X), rtol=1e-5, atol=1e-5)


def test_bad_adapter_dir_is_a_clear_error(tmp_path):
    assert main(["lora", "merge", "--base", str(tmp_path), "--adapter", str(tmp_path), "--out", str(tmp_path)]) == 2
    model = LlamaModel(tiny_model_config())
    cfg = tmp_path / "adapter_config.json"
    for text, message in [(json.dumps({"peft_type": "IA3"}), "field 'peft_type'.*only LORA"),
                          ('{"peft_type": "LORA",', "adapter_config.json:1: not valid JSON"),
                          (json.dumps({"peft_type": "LORA", "lora_alpha": 8}), "field 'r': missing"),
                          (json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}),
                           "adapter_model.safetensors: the adapter's weights are missing")]:
        cfg.write_text(text)
        with pytest.raises(AthanorError, match=message):
            load_adapter(model, tmp_path)
