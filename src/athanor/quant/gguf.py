"""GGUF files for llama.cpp: export an athanor (or HF-layout Llama) model, and import one back.

Written with the `gguf` package (gguf-py). What llama.cpp needs, per the GGUF spec and its
llama loader:
- metadata: `general.architecture = llama` and the `llama.*` shape keys, RMSNorm epsilon, RoPE
  base and dimension count, `general.file_type` and `general.quantization_version = 2`;
- the tokenizer: byte-level BPE as `tokenizer.ggml.model = gpt2` with the token strings by id,
  the merges in rank order, token types (1 normal, 3 control for special tokens), explicit
  BOS/EOS/PAD ids, the end-of-turn id (EOT: where llama.cpp's chat stops an answer), the
  pre-tokenizer name (`gpt-2`: GPT-2's split regex, which is what athanor's
  `ByteLevel(use_regex=True)` applies) and the chat template (`tokenizer.chat_template`);
- tensors under llama.cpp's names, shapes reversed (GGUF lists the fastest axis first), norms F32.
- RoPE: transformers rotates the two halves of each head (`rotate_half`), llama.cpp rotates
  adjacent pairs, so the rows of Q and K are permuted per head on export (K with the KV head
  count) and permuted back on import.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from athanor.errors import AthanorError
from athanor.io import _fsync_dir, atomic_write_text, refuse_to_overwrite
from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel, ModelConfig
from athanor.quant.formats import TYPES_BY_ID, QuantType
from athanor.quant.linear import QTensor, quantize_weights
from athanor.quant.schemes import Scheme, get_scheme
from athanor.tokenizer import END

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_UNUSED = 1, 3, 5


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def hf_name_of(name: str) -> str | None:
    for hf, g in _GLOBAL_NAMES.items():
        if g == name:
            return hf
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        for hf, g in _LAYER_NAMES.items():
            if g == parts[2]:
                return f"model.layers.{parts[1]}.{hf}"
    return None


def rope_permute(rows: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """Reorder the rows of a Q or K projection (or bias) between the rotate-half layout
    (per head: first half, second half) and the interleaved one (pairs (i, i + half) adjacent)."""
    rest = rows.shape[1:]
    half = rows.shape[0] // heads // 2
    if inverse:
        return rows.reshape(heads, half, 2, *rest).transpose(1, 2).reshape(rows.shape)
    return rows.reshape(heads, 2, half, *rest).transpose(1, 2).reshape(rows.shape)


def _rope_heads(hf_name: str, config: ModelConfig) -> int | None:
    if ".self_attn.q_proj." in hf_name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_key_value_heads
    return None


# -- tokenizer -------------------------------------------------------------------------------

def _tokenizer_fields(run_dir: Path, vocab_size: int) -> dict[str, Any]:
    path = run_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text())
    except FileNotFoundError:
        raise AthanorError("tokenizer.json is missing (GGUF needs the tokenizer)", path=path) from None
    except json.JSONDecodeError as e:
        raise AthanorError(f"not valid JSON: {e.msg}", path=path, line=e.lineno) from None
    model = tj.get("model", {})
    if model.get("type") != "BPE" or (tj.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise AthanorError("only byte-level BPE tokenizers can be written to GGUF (tokenizer.ggml.model=gpt2)",
                           path=path, field="model.type")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    tokens.update({a["id"]: a["content"] for a in tj.get("added_tokens", [])})
    n = max(vocab_size, max(tokens) + 1)
    # Rows of the embedding without a token (a vocabulary padded for speed) get unused placeholders.
    strings = [tokens.get(i, f"<|unused_{i}|>") for i in range(n)]
    types = [_TOKEN_CONTROL if i in special else _TOKEN_UNUSED if i not in tokens else _TOKEN_NORMAL
             for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_path = run_dir / "tokenizer_config.json"
    named = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    by_text = {t: i for i, t in enumerate(strings)}

    def special_id(key: str) -> int | None:
        text = named.get(key)
        text = text.get("content") if isinstance(text, dict) else text
        return by_text.get(text) if text else None

    return {"tokens": strings, "types": types, "merges": merges, "bos": special_id("bos_token"),
            "eos": special_id("eos_token"), "pad": special_id("pad_token"), "eot": by_text.get(END),
            "chat_template": named.get("chat_template")}


# -- export ----------------------------------------------------------------------------------

def _tensor_array(q: QTensor, hf_name: str, config: ModelConfig) -> np.ndarray:
    data = q.data
    heads = _rope_heads(hf_name, config)
    if heads is not None:
        data = rope_permute(data, heads)  # rows permute the same in bytes: blocks never span rows
    arr = data.contiguous().numpy()
    if q.qtype.name == "F32":
        arr = arr.view(np.float32)
    elif q.qtype.name == "F16":
        arr = arr.view(np.float16)
    return arr.reshape(q.rows, -1) if q.rows > 1 else arr.reshape(-1)


def export_gguf(run_dir: str | Path, out_path: str | Path, scheme: str | Scheme = "F32",
                imatrix: dict[str, torch.Tensor] | None = None, model: LlamaModel | None = None,
                weights: dict[str, QTensor] | None = None, compile: bool = False,
                force: bool = False) -> dict[str, Any]:
    """Write `out_path` (atomically) from the model and tokenizer in `run_dir`; an existing file
    there is replaced only with `force`.

    Returns a summary: the scheme's label, the type of each tensor, and the file size.
    `model` / `weights` skip reloading / requantizing when the caller already has them;
    `compile` quantizes the legacy types with `torch.compile`d graphs (same bytes).
    """
    import gguf

    run_dir, out_path = Path(run_dir), Path(out_path)
    refuse_to_overwrite(out_path, force)
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    model = model if model is not None else load_pretrained(run_dir)
    config = model.config
    weights = weights if weights is not None else quantize_weights(model, scheme, imatrix, compile)
    tok = _tokenizer_fields(run_dir, config.vocab_size)
    if len(tok["tokens"]) != config.vocab_size:
        raise AthanorError(f"tokenizer has {len(tok['tokens'])} tokens but the model's vocab_size is "
                           f"{config.vocab_size}", path=run_dir / "tokenizer.json")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch="llama")
        w.add_name(run_dir.name or "athanor")
        w.add_string("athanor.quantization", scheme.label)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_key_length(config.dim_per_head)
        w.add_value_length(config.dim_per_head)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_rope_freq_base(config.rope_theta)
        w.add_rope_dimension_count(config.dim_per_head)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(scheme.file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                         ("eot", w.add_eot_token_id)):
            if tok[key] is not None:
                add(tok[key])
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        w.add_add_bos_token(tok["bos"] is not None)  # athanor starts every text with BOS
        w.add_add_eos_token(False)
        for hf_name, q in weights.items():
            raw = None if q.qtype.name in ("F32", "F16") else gguf.GGMLQuantizationType(q.qtype.ggml_id)
            w.add_tensor(gguf_name(hf_name), _tensor_array(q, hf_name, config), raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(out_path.parent)
    return {"scheme": scheme.label, "bytes": out_path.stat().st_size,
            "types": {gguf_name(k): v.qtype.name for k, v in weights.items()}}


# -- import ----------------------------------------------------------------------------------

def _field(reader: Any, key: str, path: Path, default: Any = None, required: bool = True) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise AthanorError("required metadata key is missing", path=path, field=key)
        return default
    try:
        return f.contents()
    except Exception as e:  # a value of the wrong kind: the file is corrupt
        raise AthanorError(f"unreadable metadata value: {e}", path=path, field=key) from None


class _Truncated(Exception):
    def __init__(self, needed: int) -> None:
        self.needed = needed


def _open_reader(path: Path) -> Any:
    """gguf-py's reader over `path`. A file cut short makes gguf-py fail deep inside numpy (a
    reshape or a view of too few bytes); only then is the file read again by a reader that checks
    every read against the file's end, to say so plainly (no cost when the file is whole)."""
    from gguf import GGUFReader

    class BoundedReader(GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise _Truncated(end)
            return super()._get(offset, dtype, count, override_order)

    size = path.stat().st_size
    if size == 0:
        raise AthanorError("the file is empty", path=path)
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError/KeyError/IndexError on malformed input
        error = e
    try:
        BoundedReader(path, "r")
    except _Truncated as t:
        raise AthanorError(f"the file is truncated (or its header corrupt): it has {size:,} bytes but its header "
                           f"points to data up to byte {t.needed:,}", path=path) from None
    except Exception:  # not a truncation: the first error says what is wrong
        pass
    raise AthanorError(f"not a readable GGUF file ({type(error).__name__}: {error})", path=path) from None


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, QTensor], dict[str, Any]]:
    """Parse a llama-architecture GGUF: the config, the weights as blocks (HF names, HF row order),
    and the tokenizer fields. Any malformed, truncated or unsupported file raises AthanorError."""
    path = Path(path)
    if not path.is_file():
        raise AthanorError("no such file", path=path)
    reader = _open_reader(path)
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise AthanorError(f"architecture {arch!r} is not supported (only llama)", path=path,
                           field="general.architecture")
    heads = int(_field(reader, "llama.attention.head_count", path))
    hidden = int(_field(reader, "llama.embedding_length", path))
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    try:
        config = ModelConfig(
            model_type="llama",
            vocab_size=len(tokens),
            hidden_size=hidden,
            intermediate_size=int(_field(reader, "llama.feed_forward_length", path)),
            num_hidden_layers=int(_field(reader, "llama.block_count", path)),
            num_attention_heads=heads,
            num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", path, heads)),
            head_dim=int(_field(reader, "llama.rope.dimension_count", path, hidden // heads)),
            max_position_embeddings=int(_field(reader, "llama.context_length", path)),
            rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
            rope_theta=float(_field(reader, "llama.rope.freq_base", path, 10000.0)),
            tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
            attention_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", path, required=False),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", path, required=False),
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", path, required=False),
        )
        config.validate()
    except (TypeError, ValueError) as e:
        raise AthanorError(f"inconsistent model shape: {e}", path=path) from None

    weights: dict[str, QTensor] = {}
    for t in reader.tensors:
        hf = hf_name_of(t.name)
        if hf is None:
            raise AthanorError(f"tensor {t.name!r} is not part of a llama model athanor knows", path=path)
        qtype: QuantType | None = TYPES_BY_ID.get(int(t.tensor_type))
        if qtype is None:
            raise AthanorError(f"tensor type {t.tensor_type.name} is not supported (supported: "
                               f"{', '.join(q.name for q in TYPES_BY_ID.values())})", path=path, field=t.name)
        cols = int(t.shape[0])
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        data = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1).copy())
        heads_here = _rope_heads(hf, config)
        if heads_here is not None:
            if rows % (2 * heads_here):
                raise AthanorError(f"{rows} rows do not split into {heads_here} heads of two RoPE halves (the "
                                   "metadata's head counts do not fit the tensor)", path=path, field=t.name)
            data = rope_permute(data, heads_here, inverse=True)
        weights[hf] = QTensor(qtype, data, rows, cols)
    tok = {"tokens": list(tokens),
           "types": _field(reader, "tokenizer.ggml.token_type", path, []),
           "merges": _field(reader, "tokenizer.ggml.merges", path, []),
           "model": _field(reader, "tokenizer.ggml.model", path, ""),
           "chat_template": _field(reader, "tokenizer.chat_template", path, required=False)}
    return config, weights, tok


def load_gguf(path: str | Path) -> LlamaModel:
    """A float athanor model with the file's weights dequantized."""
    config, weights, _ = read_gguf(path)
    return model_from_weights(config, weights, path)


def model_from_weights(config: ModelConfig, weights: dict[str, QTensor], source: str | Path) -> LlamaModel:
    from athanor.model.llama import rope_tables

    with torch.device("meta"):
        model = LlamaModel(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = {k for k in shapes if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise AthanorError(f"tensors do not fit the metadata: {'missing' if missing else 'unexpected'} "
                           f"{(missing or unexpected)[:3]}", path=source)
    state = {}
    for name, q in weights.items():
        if q.rows * q.cols != shapes[name].numel():
            raise AthanorError(f"tensor has {q.rows}x{q.cols} values, the metadata implies {tuple(shapes[name])}",
                               path=source, field=gguf_name(name))
        state[name] = q.dequantize().view(shapes[name])
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(config)
    return model.eval()


def _write_tokenizer(tok: dict[str, Any], config: ModelConfig, out_dir: Path, source: Path) -> None:
    """tokenizer.json and tokenizer_config.json rebuilt from the GGUF's gpt2 vocabulary: the config
    names the special tokens and carries the chat template, as transformers' AutoTokenizer and
    `apply_chat_template` expect."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens, types = tok["tokens"], list(tok["types"]) or [_TOKEN_NORMAL] * len(tok["tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in tok["merges"]]
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. a merge of tokens not in the vocabulary
        raise AthanorError(f"the tokenizer's vocabulary and merges disagree ({e})", path=source,
                           field="tokenizer.ggml.merges") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    special = [i for i, ty in enumerate(types) if ty == _TOKEN_CONTROL]
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    atomic_write_text(out_dir / "tokenizer.json", hf.to_str(pretty=False))
    named: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key, i in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id),
                   ("pad_token", config.pad_token_id)):
        if i is not None and 0 <= i < len(tokens):
            named[key] = tokens[i]
    named["additional_special_tokens"] = [tokens[i] for i in special if tokens[i] not in named.values()]
    named["added_tokens_decoder"] = {str(i): {"content": tokens[i], "special": True, "normalized": False,
                                              "lstrip": False, "rstrip": False, "single_word": False}
                                     for i in special}
    if tok["chat_template"]:
        named["chat_template"] = tok["chat_template"]
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(named, indent=2) + "\n")


@contextmanager
def _fresh_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary directory next to `out_dir` to build into; renamed into place only when the
    block completes (a failure leaves `out_dir` as it was), replacing what was there."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if out_dir.exists():  # the caller has checked it may be replaced: moved aside, then removed
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out_dir.parent)


def import_gguf(path: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Convert a GGUF file into an athanor run directory (HF layout, float32 weights, and the
    tokenizer when the file's is byte-level BPE). A non-empty `out_dir` is replaced only with
    `force`; nothing appears there unless the whole conversion succeeds."""
    path, out_dir = Path(path), Path(out_dir)
    refuse_to_overwrite(out_dir, force)
    config, weights, tok = read_gguf(path)
    model = model_from_weights(config, weights, path)
    with _fresh_dir(out_dir) as tmp:
        save_pretrained(model, tmp)
        if tok["model"] == "gpt2":
            _write_tokenizer(tok, config, tmp, path)
    return out_dir
