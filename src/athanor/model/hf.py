"""The Hugging Face layout: `config.json` + `model.safetensors` (+ `tokenizer.json`).

athanor's parameter names already match transformers', so moving weights is a matter of the
config file and of the tied output head (absent from the file when tied). Both the newer
`rope_parameters` and the older top-level `rope_theta` / `rope_scaling` are read.

A config is read strictly: every key is either understood, checked to hold the value athanor
computes (`mlp_bias: false`, full attention in every layer, ...), or known not to change the
math (bookkeeping such as `transformers_version`). Any other key is an error naming it, since a
silently ignored switch would give a model that loads and computes something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save

from athanor.errors import AthanorError
from athanor.io import atomic_write, atomic_write_text
from athanor.model.llama import LlamaModel, ModelConfig, rope_tables

M = TypeVar("M", bound=LlamaModel)

# transformers' class names: the family, then the head (`LlamaModel.hf_head`): ForCausalLM for a language
# model, ForSequenceClassification for a reward model (train/reward_model.py).
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
HEADS = ("ForCausalLM", "ForSequenceClassification")

# Keys read into ModelConfig (or checked by config_from_hf).
UNDERSTOOD_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "tie_word_embeddings", "attention_bias", "initializer_range", "bos_token_id",
    "eos_token_id", "pad_token_id", "hidden_act", "mlp_bias", "use_sliding_window", "layer_types",
    "rope_interleaved", "use_mrope", "attention_dropout",
}
# Keys that do not change what the model computes at inference or in training: bookkeeping,
# output switches, dropout that these models set to 0, and the sliding-window size when
# sliding windows are off (Qwen's use_sliding_window / layer_types, Mistral's window against the
# context: all checked in `_check_math_keys`).
INERT_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
    "pretraining_tp", "sliding_window", "max_window_layers", "is_llama_config",
    "transformers.js_config", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class",
    "num_labels",
}


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32, head: str = "ForCausalLM"
                 ) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": [FAMILIES[config.model_type] + head],
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
        "rope_scaling": config.rope_scaling,
        "rope_parameters": {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta},
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
    elif config.model_type == "mistral":
        hf.update(sliding_window=None)  # full attention, the math athanor computes
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers,
                  layer_types=["full_attention"] * config.num_hidden_layers)
    if config.model_type == "qwen3":
        hf.update(attention_bias=config.attention_bias)
    if head == "ForSequenceClassification":  # one label: a scalar score, as transformers writes num_labels=1
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


def _check_math_keys(hf: dict[str, Any], source: str | Path) -> None:
    """Refuse keys that would change the computation in a way athanor does not implement."""
    unknown = sorted(set(hf) - UNDERSTOOD_KEYS - INERT_KEYS)
    if unknown:
        raise AthanorError(f"unknown config keys {unknown}: athanor cannot tell whether they change the model's "
                           f"math, so it refuses to guess", path=source, field=unknown[0])
    wrong = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "mlp_bias": bool(hf.get("mlp_bias")),
        "use_sliding_window": bool(hf.get("use_sliding_window")),
        "layer_types": any(t != "full_attention" for t in hf.get("layer_types") or []),
        "rope_interleaved": bool(hf.get("rope_interleaved")),
        "use_mrope": bool(hf.get("use_mrope")),
        "attention_dropout": float(hf.get("attention_dropout") or 0.0) != 0.0,
    }
    for key, bad in wrong.items():
        if bad:
            raise AthanorError(f"{key}={hf[key]!r} is not supported (athanor implements SiLU MLPs without bias, "
                               f"full causal attention without dropout in every layer and rotate-half RoPE)",
                               path=source, field=key)
    # Mistral has no switch: its window is used whenever set, and changes attention only when shorter
    # than the context (a query sees itself and the window - 1 keys before it).
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
    if hf.get("model_type") == "mistral" and window is not None and int(window) < int(context):
        raise AthanorError(f"sliding_window={window} is shorter than max_position_embeddings={context}: athanor "
                           f"computes full causal attention only", path=source, field="sliding_window")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if "type" in rope:  # the spelling before rope_type
        rope.setdefault("rope_type", rope.pop("type"))
    if rope.get("rope_type", "default") == "default":
        return theta, None
    return theta, rope


def config_from_hf(hf: dict[str, Any], source: str | Path = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise AthanorError(f"model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})",
                           path=source, field="model_type")
    _check_math_keys(hf, source)
    theta, scaling = _rope_from_hf(hf)

    def ids(key: str) -> int | None:
        value = hf.get(key)
        return value[0] if isinstance(value, list) else value

    try:
        config = ModelConfig(
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
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2's q/k/v biases are fixed by its type; Mistral has none (transformers ignores the key).
            attention_bias=bool(hf.get("attention_bias", False)) if model_type not in ("qwen2", "mistral") else False,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=ids("bos_token_id"),
            eos_token_id=ids("eos_token_id"),
            pad_token_id=ids("pad_token_id"),
        )
    except KeyError as e:
        raise AthanorError("missing required key", path=source, field=e.args[0]) from None
    try:
        config.validate()
    except AthanorError as e:
        raise AthanorError(str(e), path=source) from None
    return config


def save_pretrained(model: LlamaModel, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write `config.json` and `model.safetensors` (tied head left out, as transformers does); the
    config names the model's head (a reward model is a ...ForSequenceClassification)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    data = save(state, metadata={"format": "pt"})
    atomic_write(out_dir / "model.safetensors", lambda f: f.write(data))
    hf = config_to_hf(model.config, dtype, model.hf_head)
    atomic_write_text(out_dir / "config.json", json.dumps(hf, indent=2) + "\n")


# safetensors' dtype names (the header's "dtype" field).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _weight_files(run_dir: Path) -> list[Path]:
    single = run_dir / "model.safetensors"
    index = run_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AthanorError(f"not a safetensors index ({e})", path=index) from None
        return sorted({run_dir / f for f in weight_map.values()})
    raise AthanorError("no model.safetensors (or model.safetensors.index.json) here", path=run_dir)


def _safetensors_header(file: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensors a .safetensors file holds ({name: {dtype, shape, data_offsets}}) and where its data
    starts. Format: an 8-byte little-endian header length, the JSON header, then the raw data."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name} has dtype {info['dtype']}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise AthanorError(f"cannot read weights: not a safetensors file ({e})", path=file) from None
    return header, 8 + n


# Bytes read at a time when a weight is cast on loading: the cast goes chunk by chunk into the
# weight's final tensor, so no whole tensor exists in both dtypes at once.
CAST_CHUNK_BYTES = 16 << 20


def _read_tensor(f, file: Path, info: dict[str, Any], data_start: int, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor, cast to `dtype` (None: as stored), read with plain file reads straight into its
    own memory: no memory map whose pages would count against the process while the next tensors
    are read."""
    begin, end = info["data_offsets"]
    stored = SAFETENSORS_DTYPES[info["dtype"]]
    tensor = torch.empty(info["shape"], dtype=dtype or stored)
    n = tensor.numel()
    if n * stored.itemsize != end - begin:
        raise AthanorError(f"cannot read weights: header sizes disagree for a tensor of shape {info['shape']}",
                           path=file)
    f.seek(data_start + begin)
    flat = tensor.view(-1)
    step = max(n, 1) if tensor.dtype == stored else max(1, CAST_CHUNK_BYTES // stored.itemsize)
    buffer = flat if tensor.dtype == stored else torch.empty(min(step, n), dtype=stored)
    for at in range(0, n, step):
        part = buffer[:min(step, n - at)] if buffer is not flat else flat
        raw = part.view(torch.uint8)
        if f.readinto(memoryview(raw.numpy())) != raw.numel():
            raise AthanorError("cannot read weights: the file is truncated", path=file)
        if buffer is not flat:
            flat[at:at + part.numel()].copy_(part)
    return tensor


def load_pretrained(run_dir: str | Path, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", model_class: type[M] = LlamaModel) -> M:
    """Load an athanor run directory or a Llama/Mistral/Qwen2/Qwen3 checkpoint saved by transformers (one
    file or shards with an index). `dtype=None` keeps each weight's dtype as stored (bf16 stays bf16).
    `model_class` is LlamaModel or a subclass with another head (a reward model); the checkpoint's
    `architectures` must name that head."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise AthanorError("not a model directory: config.json is missing", path=run_dir)
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AthanorError(f"not valid JSON: {e.msg}", path=cfg_path, line=e.lineno) from None
    config = config_from_hf(hf, cfg_path)
    architecture = (hf.get("architectures") or [""])[0]
    if architecture.endswith(HEADS) and not architecture.endswith(model_class.hf_head):
        raise AthanorError(f"the checkpoint is a {architecture}; this needs a model with the "
                           f"{model_class.hf_head.removeprefix('For')} head", path=cfg_path, field="architectures")
    with torch.device("meta"):
        model = model_class(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    tied = config.tie_word_embeddings and hasattr(model, "lm_head")
    if tied:
        shapes.pop("lm_head.weight")
    # Names and shapes are checked from the headers before any weight is read; then each tensor is
    # read, cast and kept alone, so memory peaks at the model in `dtype` plus one tensor.
    where: dict[str, tuple[Path, dict[str, Any], int]] = {}
    for file in _weight_files(run_dir):
        header, data_start = _safetensors_header(file)
        for raw_name, info in header.items():
            name = raw_name.removeprefix("module.")
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue
            where[name] = (file, info, data_start)
    missing, unexpected = sorted(set(shapes) - set(where)), sorted(set(where) - set(shapes))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise AthanorError(f"weights do not fit the config: {detail}", path=run_dir)
    for name, (_, info, _) in where.items():
        if tuple(info["shape"]) != tuple(shapes[name]):
            raise AthanorError(f"weights do not fit the config: {name} is {tuple(info['shape'])}, the config "
                               f"says {tuple(shapes[name])}", path=run_dir)
    state: dict[str, torch.Tensor] = {}
    for file in sorted({f for f, _, _ in where.values()}):
        with open(file, "rb") as f:
            for name, (tfile, info, data_start) in where.items():
                if tfile == file:
                    state[name] = _read_tensor(f, file, info, data_start, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers are not in the file: rebuild the rotary tables off the meta device.
    cos, sin = rope_tables(config)
    model.rope_cos, model.rope_sin = cos, sin
    return model.to(device)
