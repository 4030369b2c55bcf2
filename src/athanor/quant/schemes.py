"""Quantization schemes: which GGML type each weight matrix gets.

A *pure* scheme (F32, F16, Q8_0, Q4_0, ..., Q6_K) gives every weight matrix the same type. A
*mix* follows llama.cpp's `llama_tensor_get_type` for its K-quant file types: the output head
(or, when it is tied, the token embedding that doubles as it) is kept at Q6_K, and `attn_v` and
`ffn_down` of the first and last eighth of the layers, plus every third layer in between, are
raised to Q6_K too, because errors there cost the most perplexity. Norms and biases stay F32
in every scheme (they are tiny, and llama.cpp expects them so).

K-quants need rows that are a multiple of 256 long; where a row is not, the type falls back as
llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0 here since athanor has
no IQ4_NL, TQ2_0 -> Q4_0), and a legacy type on rows not a multiple of 32 falls back to F16.
"""

from __future__ import annotations

from dataclasses import dataclass

from athanor.errors import AthanorError
from athanor.model.llama import ModelConfig
from athanor.quant.formats import TYPES, QuantType


@dataclass(frozen=True)
class Scheme:
    name: str
    base: str               # type of most weight matrices
    raised: str | None      # mixes: type of the output head and the chosen attn_v / ffn_down
    file_type: int          # llama.cpp's LLAMA_FTYPE value for general.file_type

    @property
    def is_mix(self) -> bool:
        return self.raised is not None

    @property
    def label(self) -> str:
        if not self.is_mix:
            return f"{self.name} (pure: every weight matrix {self.base})"
        return f"{self.name} (mix: {self.base}; output head and some attn_v/ffn_down {self.raised})"


SCHEMES: dict[str, Scheme] = {s.name: s for s in [
    Scheme("F32", "F32", None, 0),
    Scheme("F16", "F16", None, 1),
    Scheme("Q8_0", "Q8_0", None, 7),
    Scheme("Q5_1", "Q5_1", None, 9),
    Scheme("Q5_0", "Q5_0", None, 8),
    Scheme("Q4_1", "Q4_1", None, 3),
    Scheme("Q4_0", "Q4_0", None, 2),
    Scheme("Q6_K", "Q6_K", None, 18),
    Scheme("Q5_K", "Q5_K", None, 16),
    Scheme("Q4_K", "Q4_K", None, 14),
    Scheme("Q3_K", "Q3_K", None, 11),
    Scheme("Q2_K", "Q2_K", None, 10),
    Scheme("TQ2_0", "TQ2_0", None, 37),
    Scheme("Q5_K_M", "Q5_K", "Q6_K", 17),
    Scheme("Q4_K_M", "Q4_K", "Q6_K", 15),
    Scheme("Q3_K_M", "Q3_K", "Q5_K", 12),
]}

_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "TQ2_0": "Q4_0"}


def get_scheme(name: str) -> Scheme:
    s = SCHEMES.get(name.upper())
    if s is None:
        raise AthanorError(f"unknown quantization type {name!r} (known: {', '.join(SCHEMES)})", field="types")
    return s


def _use_more_bits(layer: int, n_layers: int) -> bool:
    # llama.cpp's use_more_bits(): first and last eighth, and every third layer in between.
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def fit_type(name: str, cols: int) -> QuantType:
    """The type itself if a row of `cols` splits into its blocks, else its fallback."""
    while TYPES[name].block_size > 1 and cols % TYPES[name].block_size:
        name = _FALLBACK.get(name, "F16")
    return TYPES[name]


def weight_type(scheme: Scheme, hf_name: str, cols: int, config: ModelConfig) -> QuantType:
    """The type of one weight of the HF-named state dict under `scheme` (1-D tensors: F32)."""
    if not hf_name.endswith(".weight") or "norm" in hf_name:
        return TYPES["F32"]
    name = scheme.base
    if scheme.is_mix:
        head = hf_name == "lm_head.weight" or (config.tie_word_embeddings and hf_name == "model.embed_tokens.weight")
        if head:
            name = scheme.raised
        elif hf_name.endswith(("self_attn.v_proj.weight", "mlp.down_proj.weight")):
            layer = int(hf_name.split(".")[2])
            if _use_more_bits(layer, config.num_hidden_layers):
                name = scheme.raised
    return fit_type(name, cols)
