"""GGUF files for llama.cpp: export an athanor model or a Llama/Mistral/Qwen2/Qwen3 checkpoint, and import one back.

Written with the `gguf` package (gguf-py). What llama.cpp needs, per the GGUF spec and its loaders:
- metadata: `general.architecture` (`llama`, `qwen2` or `qwen3`, each with its own key prefix) and
  the shape keys, RMSNorm epsilon, RoPE base, dimension count and linear scaling, `general.file_type`
  and `general.quantization_version = 2`;
- the tokenizer, as `athanor.quant.gguf_vocab` writes it;
- tensors under llama.cpp's names, shapes reversed (GGUF lists the fastest axis first), norms F32;
  Qwen2's q/k/v biases, Qwen3's q/k norms (`attn_q_norm`, `attn_k_norm`), no `output` when the
  head is tied, and Llama 3's RoPE scaling as a `rope_freqs` tensor of per-frequency divisors
  (llama.cpp has no keys for it).
- RoPE: transformers rotates the two halves of each head (`rotate_half`); llama.cpp's `llama`
  rotates adjacent pairs, so there the rows of Q and K are permuted per head on export (K with
  the KV head count) and permuted back on import. Its `qwen2` and `qwen3` rotate halves: no permutation.
What llama.cpp cannot compute the same way (Qwen3 with an attention output bias, Llama 3 scaling on
a Qwen) is refused with one error, never written approximately.
"""

from __future__ import annotations

import dataclasses
import math
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
from athanor.io import _fsync_dir, refuse_to_overwrite
from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel, ModelConfig, rope_inv_freq
from athanor.quant.formats import TYPES_BY_ID, QuantType
from athanor.quant.gguf_vocab import GGUFVocab, vocab_from_run, write_tokenizer, write_vocab
from athanor.quant.linear import QTensor, quantize_weights
from athanor.quant.schemes import Scheme, get_scheme

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
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_ROPE_FREQS = "rope_freqs.weight"


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


def _permute_rows(data: torch.Tensor, rows: int, cols: int, heads: int, inverse: bool = False) -> torch.Tensor:
    """`rope_permute` of a Q or K tensor's bytes: a weight's rows, or a bias's values (stored as one
    row of F32: one value per row of its weight)."""
    by_row = data if rows > 1 else data.view(cols, -1)
    return rope_permute(by_row, heads, inverse).reshape(data.shape)


def _gguf_arch(config: ModelConfig) -> str:
    """llama.cpp's architecture for the model: Mistral (full attention) is Llama's math, which
    llama.cpp's own convert_hf_to_gguf.py writes as `llama`."""
    return "llama" if config.model_type == "mistral" else config.model_type


def _rope_heads(hf_name: str, config: ModelConfig) -> int | None:
    """Heads to permute the rows of Q and K by: llama.cpp's `llama` architecture rotates adjacent
    pairs; its `qwen2`/`qwen3` rotate halves ("NEOX"), as transformers does, so they stay as they are."""
    if _gguf_arch(config) != "llama":
        return None
    if ".self_attn.q_proj." in hf_name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_key_value_heads
    return None


# -- export ----------------------------------------------------------------------------------

def _tensor_array(q: QTensor, hf_name: str, config: ModelConfig) -> np.ndarray:
    data = q.data
    heads = _rope_heads(hf_name, config)
    if heads is not None:
        data = _permute_rows(data, q.rows, q.cols, heads)  # bytes permute as rows do: blocks never span rows
    arr = data.contiguous().numpy()
    if q.qtype.name == "F32":
        arr = arr.view(np.float32)
    elif q.qtype.name == "F16":
        arr = arr.view(np.float16)
    return arr.reshape(q.rows, -1) if q.rows > 1 else arr.reshape(-1)


def _check_exportable(config: ModelConfig, run_dir: Path) -> dict[str, np.ndarray]:
    """Refuse what llama.cpp's architecture of the same name cannot compute; return the tensors the
    file needs beyond the weights (Llama 3's RoPE scaling as `rope_freqs`, which llama.cpp's
    `llama` divides each rotary frequency by)."""
    source = run_dir / "config.json"
    if config.model_type == "qwen3" and config.o_bias:
        raise AthanorError("a qwen3 model with attention_bias cannot be written to GGUF: llama.cpp's qwen3 has no "
                           "attention output bias", path=source, field="attention_bias")
    rope_type = (config.rope_scaling or {}).get("rope_type", "default")
    if rope_type == "llama3" and _gguf_arch(config) != "llama":
        raise AthanorError(f"RoPE scaling 'llama3' on a {config.model_type} model cannot be written to GGUF (llama.cpp "
                           "reads per-frequency factors only for the llama architecture)", path=source,
                           field="rope_scaling")
    if rope_type not in ("default", "linear", "llama3"):
        raise AthanorError(f"RoPE scaling {rope_type!r} cannot be written to GGUF", path=source, field="rope_scaling")
    if rope_type != "llama3":
        return {}
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    return {_ROPE_FREQS: (plain / rope_inv_freq(config)).numpy().astype(np.float32)}


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
    extra = _check_exportable(config, run_dir)
    vocab = vocab_from_run(run_dir, config.vocab_size)
    if len(vocab.tokens) != config.vocab_size:
        raise AthanorError(f"tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is "
                           f"{config.vocab_size}", path=run_dir / "tokenizer.json")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch=_gguf_arch(config))
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
        if (config.rope_scaling or {}).get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(scheme.file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(w, vocab)
        for name, array in extra.items():
            w.add_tensor(name, array)
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


ARCHITECTURES = ("llama", "qwen2", "qwen3")


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal its writer meant (1e-06, not 9.999999974752427e-07):
    the shortest one that rounds to the same float32."""
    return float(str(np.float32(value)))


def _rope_scaling(reader: Any, arch: str, path: Path, base: ModelConfig) -> dict[str, Any] | None:
    """transformers' rope_scaling for the file's `rope.scaling.*` keys (linear) or its `rope_freqs`
    factors (Llama 3: a stretch of the long wavelengths, kept short ones, a smooth band between)."""
    kind = _field(reader, f"{arch}.rope.scaling.type", path, "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(_field(reader, f"{arch}.rope.scaling.factor", path))}
    if kind != "none":
        raise AthanorError(f"RoPE scaling {kind!r} is not supported (supported: linear, llama3)", path=path,
                           field=f"{arch}.rope.scaling.type")
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is None:
        return None
    factors = torch.from_numpy(np.asarray(freqs.data, dtype=np.float32).reshape(-1).copy())
    scaling = _llama3_scaling(factors, rope_inv_freq(base))
    if scaling is None:
        raise AthanorError("these rotary frequency factors are not a Llama 3 RoPE scaling (the only kind athanor "
                           "reads from rope_freqs)", path=path, field=_ROPE_FREQS)
    return scaling


def _llama3_scaling(factors: torch.Tensor, inv_freq: torch.Tensor) -> dict[str, Any] | None:
    """Llama 3 scaling parameters that reproduce `factors` (None if none do). Only the wavelength
    bounds original/low and original/high matter, so low_freq_factor is taken as 1; with two or more
    factors inside the smooth band the bounds come from its line, otherwise they sit at the band's edges."""
    if factors.shape != inv_freq.shape or not bool((factors >= 1).all()):
        return None
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    wavelength = 2 * math.pi / inv_freq.double()
    f = factors.double()
    band = (f > 1 + 1e-6) & (f < factor - 1e-6)
    if int(band.sum()) >= 2:  # smooth = (original / wavelength - 1) / (high - 1), linear in 1 / wavelength
        smooth = (1 / f[band] - 1 / factor) / (1 - 1 / factor)
        x = 1 / wavelength[band]
        slope = float(((x - x.mean()) * (smooth - smooth.mean())).sum() / ((x - x.mean()) ** 2).sum())
        offset = float(smooth.mean() - slope * x.mean())
        high = 1 - 1 / offset if offset < 0 else None
        original = -slope / offset if offset < 0 else None
    else:  # the band's edges inside the gap, apart from every wavelength, so clamping keeps 1 and factor exact
        kept, stretched = wavelength[f <= 1 + 1e-6], wavelength[f >= factor - 1e-6]
        if len(kept) == 0 or len(stretched) == 0 or float(kept.max()) >= float(stretched.min()):
            return None
        gap = float(stretched.min()) - float(kept.max())
        original = float(kept.max()) + 2 * gap / 3
        high = original / (float(kept.max()) + gap / 3)
    if high is None or original is None or high <= 1:
        return None
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
               "original_max_position_embeddings": original}
    wave = 2 * math.pi / inv_freq
    smooth = ((original / wave - 1) / (high - 1)).clamp(0, 1)
    rebuilt = 1 / ((1 - smooth) / factor + smooth)
    return scaling if torch.allclose(rebuilt.float(), factors, rtol=1e-5) else None


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, QTensor], GGUFVocab]:
    """Parse a llama, qwen2 or qwen3 GGUF: the config, the weights as blocks (HF names, HF row
    order) and the tokenizer fields. Any malformed, truncated or unsupported file raises AthanorError."""
    path = Path(path)
    if not path.is_file():
        raise AthanorError("no such file", path=path)
    reader = _open_reader(path)
    arch = _field(reader, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise AthanorError(f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})",
                           path=path, field="general.architecture")
    heads = int(_field(reader, f"{arch}.attention.head_count", path))
    hidden = int(_field(reader, f"{arch}.embedding_length", path))
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    names = {t.name for t in reader.tensors}
    ids = {key: _field(reader, f"tokenizer.ggml.{field}", path, required=False)
           for key, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
                              ("pad", "padding_token_id"), ("unk", "unknown_token_id"))}
    try:
        head_dim = _field(reader, f"{arch}.attention.key_length", path, required=False)
        config = ModelConfig(
            model_type=arch,
            vocab_size=len(tokens),
            hidden_size=hidden,
            intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", path)),
            num_hidden_layers=int(_field(reader, f"{arch}.block_count", path)),
            num_attention_heads=heads,
            num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", path, heads)),
            head_dim=int(head_dim or _field(reader, f"{arch}.rope.dimension_count", path, hidden // heads)),
            max_position_embeddings=int(_field(reader, f"{arch}.context_length", path)),
            rms_norm_eps=_f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
            rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
            tie_word_embeddings="output.weight" not in names,
            # qwen2's q/k/v biases come with the architecture; llama's and qwen3's flag covers all four.
            attention_bias=arch != "qwen2" and "blk.0.attn_q.bias" in names,
            bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        )
        config.rope_scaling = _rope_scaling(reader, arch, path, config)
        config.validate()
    except (TypeError, ValueError) as e:
        raise AthanorError(f"inconsistent model shape: {e}", path=path) from None

    weights: dict[str, QTensor] = {}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue
        hf = hf_name_of(t.name)
        if hf is None:
            raise AthanorError(f"tensor {t.name!r} is not part of a {arch} model athanor knows", path=path)
        qtype: QuantType | None = TYPES_BY_ID.get(int(t.tensor_type))
        if qtype is None:
            raise AthanorError(f"tensor type {t.tensor_type.name} is not supported (supported: "
                               f"{', '.join(q.name for q in TYPES_BY_ID.values())})", path=path, field=t.name)
        cols = int(t.shape[0])
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        data = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1).copy())
        heads_here = _rope_heads(hf, config)
        if heads_here is not None:
            n = rows if rows > 1 else cols
            if n % (2 * heads_here):
                raise AthanorError(f"{n} rows do not split into {heads_here} heads of two RoPE halves (the "
                                   "metadata's head counts do not fit the tensor)", path=path, field=t.name)
            data = _permute_rows(data, rows, cols, heads_here, inverse=True)
        weights[hf] = QTensor(qtype, data, rows, cols)
    scores = _field(reader, "tokenizer.ggml.scores", path, required=False)
    vocab = GGUFVocab(model=_field(reader, "tokenizer.ggml.model", path, ""), tokens=list(tokens),
                      types=list(_field(reader, "tokenizer.ggml.token_type", path, [])),
                      pre=_field(reader, "tokenizer.ggml.pre", path, required=False),
                      merges=list(_field(reader, "tokenizer.ggml.merges", path, [])),
                      scores=None if scores is None else list(scores),
                      ids={k: int(i) for k, i in ids.items() if i is not None},
                      add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", path, False)),
                      chat_template=_field(reader, "tokenizer.chat_template", path, required=False))
    return config, weights, vocab


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
    """Convert a GGUF file into an athanor run directory (HF layout, float32 weights and the
    tokenizer; a tokenizer other than byte-level BPE is an error). A non-empty `out_dir` is replaced only with
    `force`; nothing appears there unless the whole conversion succeeds."""
    path, out_dir = Path(path), Path(out_dir)
    refuse_to_overwrite(out_dir, force)
    config, weights, vocab = read_gguf(path)
    model = model_from_weights(config, weights, path)
    with _fresh_dir(out_dir) as tmp:
        save_pretrained(model, tmp)
        write_tokenizer(vocab, tmp, path)
    return out_dir
