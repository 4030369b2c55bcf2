"""The Hugging Face layout: `config.json` + `model.safetensors` (+ `tokenizer.json`).

athanor's parameter names already match transformers', so moving weights is a matter of the
config file and of the tied output head (absent from the file when tied). Both the newer
`rope_parameters` and the older top-level `rope_theta` / `rope_scaling` are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from athanor.errors import AthanorError
from athanor.io import atomic_write, atomic_write_text
from athanor.model.llama import LlamaModel, ModelConfig, rope_tables

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if config.model_type == "llama":
        hf.update(attention_bias=config.attention_bias, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    return hf


def config_from_hf(hf: dict[str, Any], source: str | Path = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise AthanorError(f"model_type {model_type!r} is not supported (supported: {sorted(ARCHITECTURES)})",
                           path=source, field="model_type")
    if hf.get("hidden_act", "silu") != "silu":
        raise AthanorError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)", path=source,
                           field="hidden_act")
    if hf.get("mlp_bias"):
        raise AthanorError("mlp_bias is not supported", path=source, field="mlp_bias")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise AthanorError("sliding-window attention is not supported", path=source, field="use_sliding_window")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise AthanorError(f"RoPE scaling {rope_type!r} is not supported (only default)", path=source,
                           field="rope_parameters.rope_type")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

    def ids(key: str) -> int | None:
        value = hf.get(key)
        return value[0] if isinstance(value, list) else value

    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)) if model_type == "llama" else False,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=ids("bos_token_id"),
            eos_token_id=ids("eos_token_id"),
            pad_token_id=ids("pad_token_id"),
        )
    except KeyError as e:
        raise AthanorError("missing required key", path=source, field=e.args[0]) from None


def save_pretrained(model: LlamaModel, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write `config.json` and `model.safetensors` (tied head left out, as transformers does)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    data = save(state, metadata={"format": "pt"})
    atomic_write(out_dir / "model.safetensors", lambda f: f.write(data))
    atomic_write_text(out_dir / "config.json", json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n")


def _read_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    single = run_dir / "model.safetensors"
    index = run_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({run_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise AthanorError("no model.safetensors (or model.safetensors.index.json) here", path=run_dir)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise AthanorError(f"cannot read weights: {e}", path=f) from None
    return state


def load_pretrained(run_dir: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> LlamaModel:
    """Load an athanor run directory or a Llama/Qwen2 checkpoint saved by transformers."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise AthanorError("not a model directory: config.json is missing", path=run_dir)
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AthanorError(f"not valid JSON: {e.msg}", path=cfg_path, line=e.lineno) from None
    config = config_from_hf(hf, cfg_path)
    with torch.device("meta"):
        model = LlamaModel(config)
    state = {k.removeprefix("module."): v for k, v in _read_weights(run_dir).items()}
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise AthanorError(f"weights do not fit the config: {detail}", path=run_dir)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for name, tensor in state.items():
        if tensor.shape != shapes[name]:
            raise AthanorError(f"weights do not fit the config: {name} is {tuple(tensor.shape)}, the config "
                               f"says {tuple(shapes[name])}", path=run_dir)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers are not in the file: rebuild the rotary tables off the meta device.
    cos, sin = rope_tables(config)
    model.rope_cos, model.rope_sin = cos, sin
    return model.to(device)
