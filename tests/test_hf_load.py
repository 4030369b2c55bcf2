"""Reading checkpoints in the HF layout: configs read strictly, weights streamed (no second copy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model_config

from athanor.errors import AthanorError
from athanor.model.hf import config_from_hf, config_to_hf, load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel


def _hf(**changes) -> dict:
    hf = config_to_hf(tiny_model_config())
    hf.update(changes)
    return hf


def test_round_trip_keeps_every_family_switch() -> None:
    for kw in ({"model_type": "qwen3", "head_dim": 32, "attention_bias": True},
               {"model_type": "mistral", "head_dim": 16},
               {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 5e5, "head_dim": 16}):
        config = tiny_model_config(**kw)
        assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


@pytest.mark.parametrize("changes, field", [
    ({"some_new_switch": True}, "some_new_switch"),                    # unknown: never silently ignored
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_interleaved": True}, "rope_interleaved"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "rope_scaling"),
    ({"model_type": "gemma"}, "model_type"),
    ({"model_type": "mistral", "sliding_window": 127}, "sliding_window"),  # shorter than the 128 positions
])
def test_configs_that_change_the_math_are_refused(changes: dict, field: str) -> None:
    with pytest.raises(AthanorError, match=field):
        config_from_hf(_hf(**changes), "ckpt/config.json")


def test_mistral_is_llama_math_when_its_window_covers_the_context() -> None:
    """Mistral v0.2+ ships sliding_window null; a window as long as the context masks nothing."""
    for window in (None, 128, 4096):
        config = config_from_hf(_hf(model_type="mistral", sliding_window=window, attention_bias=True))
        assert config.model_type == "mistral" and not config.attention_bias  # transformers' Mistral has no biases
        assert config_to_hf(config)["model_type"] == "mistral"


def test_older_spellings_of_rope_settings_are_read() -> None:
    hf = _hf(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    del hf["rope_parameters"]
    config = config_from_hf(hf)
    assert config.rope_theta == 5e5 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_truncated_weights_are_a_clear_error(tmp_path: Path) -> None:
    save_pretrained(LlamaModel(tiny_model_config()), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(AthanorError, match="truncated"):
        load_pretrained(tmp_path)


# The shape of Qwen2.5-0.5B (494M parameters, 0.99 GB in bf16), in four shards of random weights.
WRITE_AND_LOAD = """
import json, resource, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out = Path(sys.argv[1])
if sys.argv[2] == "write":
    from athanor.model.hf import config_to_hf
    from athanor.model.llama import LlamaModel, ModelConfig
    cfg = ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaModel(cfg).state_dict().items() if k != "lm_head.weight"}
    names, weight_map, shard, size = sorted(shapes), {}, {}, 0
    for i, name in enumerate(names):
        shard[name] = torch.randn(shapes[name], dtype=torch.bfloat16) * 0.02
        if sum(t.numel() for t in shard.values()) * 2 > 260e6 or i == len(names) - 1:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
            size += sum(t.numel() for t in shard.values()) * 2
            shard = {}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.bfloat16)))
    print(size)
else:
    from athanor.model.hf import load_pretrained
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = load_pretrained(out, dtype=None if sys.argv[2] == "bf16" else torch.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(before, peak, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.slow
def test_a_half_billion_parameter_sharded_bf16_checkpoint_loads_in_one_copy(tmp_path: Path) -> None:
    def run(*args: str) -> list[int]:
        r = subprocess.run([sys.executable, "-c", WRITE_AND_LOAD, str(tmp_path), *args], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return [int(x) for x in r.stdout.split()]

    (file_bytes,) = run("write")
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 3
    for mode, model_bytes in (("bf16", file_bytes), ("f32", 2 * file_bytes)):
        before, peak, loaded = run(mode)
        assert loaded == model_bytes
        # The process's high-water mark grew by the model it holds, plus at most 30 %: no second
        # copy of the weights (the file's bytes in a map, or bf16 and f32 side by side).
        assert peak - before < 1.3 * model_bytes, (mode, (peak - before) / model_bytes)
