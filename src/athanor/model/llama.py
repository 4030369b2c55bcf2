"""A Llama-family decoder, readable top to bottom.

The architecture of Llama (Touvron et al., 2023) and its relatives: pre-norm blocks of
RMSNorm -> grouped-query attention with rotary positions -> residual, RMSNorm -> SwiGLU MLP ->
residual; a final RMSNorm and a (possibly tied) output head. The relatives differ in a few
switches of `ModelConfig`: Qwen2 adds q/k/v biases, Qwen3 an RMSNorm over each q and k head
before the rotation, Llama 3.1+ stretches the rotary frequencies for long contexts.

The modules here hold the weights; the layer's math is model/block.py's `decoder_layer`, which
the inference fast path (serve/fast.py) runs too, on its own copies of the same weights.

Module and parameter names mirror transformers' `LlamaForCausalLM` exactly
(`model.layers.N.self_attn.q_proj.weight`, ...), so a state dict moves between the two
without renaming, and the config's field names are those of `LlamaConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from athanor.model.block import Attend, Kernels, decoder_layer, sdpa_layers
from athanor.model.fused import apply_rope, rms_norm, rotary_qkv, rotate_half, swiglu  # noqa: F401 (re-exported)
from athanor.model.linear_ce import linear_cross_entropy, linear_token_logprobs


@dataclass
class ModelConfig:
    """Shape of the model; field names follow transformers' `LlamaConfig` / `Qwen2Config`."""

    model_type: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama"  # mistral: Llama's math, full attention
    vocab_size: int = 4096
    hidden_size: int = 256  # a multiple of 256 keeps every row K-quant friendly
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # < num_attention_heads: grouped-query attention (Ainslie et al., 2023)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # transformers' rope scaling dict without the theta: {"rope_type": "linear", "factor": 4.0} or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None = plain RoPE. See `rope_inv_freq`.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Llama's and Qwen3's flag: biases on q, k, v and o (Mistral has none)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalizes every q and k head (RMSNorm over head_dim) before RoPE."""
        return self.model_type == "qwen3"

    def validate(self) -> None:
        from athanor.errors import AthanorError

        if self.num_attention_heads % self.num_key_value_heads:
            raise AthanorError("num_attention_heads must be a multiple of num_key_value_heads",
                               field="model.num_key_value_heads")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise AthanorError("hidden_size must be a multiple of num_attention_heads",
                               field="model.hidden_size")
        if self.model_type == "mistral" and self.attention_bias:
            raise AthanorError("a mistral model has no attention biases (transformers' Mistral ignores the flag)",
                               field="model.attention_bias")
        if self.dim_per_head % 2:
            raise AthanorError("the head dimension must be even for rotary embeddings", field="model.head_dim")
        rope_inv_freq(self)  # a bad rope_scaling is an error now, not at the first forward

    def num_parameters(self) -> int:
        d, h = self.hidden_size, self.dim_per_head
        attn = d * h * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        attn += (self.num_attention_heads + 2 * self.num_key_value_heads) * h * self.qkv_bias + d * self.o_bias
        attn += 2 * h * self.qk_norm
        mlp = 3 * d * self.intermediate_size
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + mlp + 2 * d) + emb + d


class KVCache:
    """Preallocated keys and values for every layer: (batch, kv_heads, max_len, head_dim) each.

    `select(rows)` gives a view on some of the batch rows (an engine's active slots) that writes
    into the same storage, so requests can join and leave a running batch without copies.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.dim_per_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.rows: slice | torch.Tensor = slice(None)

    def select(self, rows: list[int]) -> KVCache:
        """A view on batch rows `rows` (a contiguous run is sliced; anything else is gathered)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = self.k, self.v, self.max_len
        contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
        view.rows = slice(rows[0], rows[0] + len(rows)) if contiguous and rows else \
            torch.tensor(rows, device=self.k.device)
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions [start, start+T) and return all keys/values up to start+T.

        `start` is one int for the whole batch, or a (batch,) tensor of per-row starts; then the
        returned keys reach max(start)+T and the caller masks each row's unwritten tail.
        """
        T = k.shape[2]
        if isinstance(start, int):
            end = start + T
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
            self.k[layer, self.rows, :, start:end] = k
            self.v[layer, self.rows, :, start:end] = v
        else:
            end = int(start.max()) + T
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
            pos = start[:, None] + torch.arange(T, device=start.device)  # (B, T)
            rows = torch.arange(self.k.shape[1], device=pos.device)[self.rows]
            # Advanced indices on the batch and time axes put (B, T) first: (B, T, kv_heads, head_dim).
            self.k[layer][rows[:, None], :, pos] = k.transpose(1, 2)
            self.v[layer][rows[:, None], :, pos] = v.transpose(1, 2)
        return self.k[layer, self.rows, :, :end], self.v[layer, self.rows, :, :end]


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """The rotary frequencies of a head's dimension pairs: theta^(-2i/d) (Su et al., 2021), with
    the checkpoint's scaling applied:
    - "linear" (position interpolation, Chen et al., 2023): every frequency divided by `factor`;
    - "llama3" (Llama 3.1): wavelengths longer than original_max_position_embeddings / low_freq_factor
      are stretched by `factor`, those shorter than original / high_freq_factor kept, and the band
      between interpolated linearly in original / wavelength.
    """
    from athanor.errors import AthanorError

    hd = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    scaling = dict(config.rope_scaling or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise AthanorError(f"RoPE scaling {rope_type!r} is not supported (supported: {list(ROPE_TYPES)})",
                           field="rope_scaling.rope_type")
    try:
        if rope_type == "linear":
            return inv_freq / float(scaling["factor"])
        if rope_type == "llama3":
            factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
            original = float(scaling["original_max_position_embeddings"])
            wavelength = 2 * math.pi / inv_freq
            smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: stretched, 1: kept
            return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    except KeyError as e:
        raise AthanorError(f"RoPE scaling {rope_type!r} needs {e.args[0]!r}", field="rope_scaling") from None
    return inv_freq


def rope_tables(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of position * inverse frequency (see `rope_inv_freq`), shape (max_pos, head_dim).

    Laid out for the "rotate half" convention that transformers uses: the first half of a head's
    dimensions pairs with the second half. (llama.cpp pairs adjacent dimensions instead; GGUF
    export permutes q/k rows to match.)
    """
    inv_freq = rope_inv_freq(config, device)
    pos = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm(x, self.weight.shape, self.weight, self.eps)


def _norm(x: torch.Tensor, shape: tuple[int, ...], weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in fp32 even under bf16 autocast, as Llama does, then cast back.
    return rms_norm(x.float(), weight.float(), eps).to(x.dtype)


def _rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rotary_qkv(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype), n_q, n_kv)


# The training model's kernels (see model/block.py): fused backward passes (model/fused.py), fp32 norms.
TRAINING_KERNELS = Kernels(norm=_norm, rope=_rope, swiglu=swiglu)


def weights_version(model: nn.Module) -> list[tuple[int, int]]:
    """Changes whenever a parameter is replaced (its storage moves) or modified in place (its version
    counter: an optimizer step or `load_state_dict` bumps it): for caches built from the weights."""
    return [(p.data_ptr(), p._version) for p in model.parameters()]


def stacked_weights(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights (and biases) of linear layers that read the same input, stacked along the output axis."""
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return torch.cat([m.weight for m in linears]), bias


def stacked_linear(x: torch.Tensor, linears: Sequence[nn.Module]) -> torch.Tensor:
    """`torch.cat([m(x) for m in linears], -1)`, as one matrix product when it can be.

    q/k/v (and gate/up) read the same input: one product with their weights stacked is a larger,
    faster matmul, in forward and in backward (where it also saves summing three input
    gradients). The concatenation of the weights costs little next to it and autograd splits its
    gradient back onto each layer's own parameters. That is for training: at inference the copy
    would be made for every decoded token (serve/fast.py stacks once instead), so without
    autograd, and for anything but a plain `nn.Linear` without hooks (LoRA, quantized layers,
    imatrix collection), the layers run one by one.
    """
    plain = all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in linears)
    if plain and torch.is_grad_enabled():
        return F.linear(x, *stacked_weights(linears))  # type: ignore[arg-type]
    return torch.cat([m(x) for m in linears], dim=-1)


class Attention(nn.Module):
    """The attention's projections (and Qwen3's head norms) under transformers' names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h = config.hidden_size, config.dim_per_head
        self.q_proj = nn.Linear(d, config.num_attention_heads * h, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * h, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * h, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * h, d, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps)
            self.k_norm = RMSNorm(h, config.rms_norm_eps)


class MLP(nn.Module):
    """SwiGLU feed-forward's projections (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    """One layer's weights under transformers' names, as model/block.py's `LayerParts`: its math is
    `decoder_layer` there. The projections call the modules, so LoRA, quantized layers and
    hooks that replace or wrap them take part."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, config: ModelConfig, kernels: Kernels, cos: torch.Tensor, sin: torch.Tensor,
                attend: Attend) -> torch.Tensor:
        return decoder_layer(x, self, config, kernels, cos, sin, attend)

    @property
    def input_norm(self) -> torch.Tensor:
        return self.input_layernorm.weight

    @property
    def post_norm(self) -> torch.Tensor:
        return self.post_attention_layernorm.weight

    @property
    def q_norm(self) -> torch.Tensor | None:
        return self.self_attn.q_norm.weight if hasattr(self.self_attn, "q_norm") else None

    @property
    def k_norm(self) -> torch.Tensor | None:
        return self.self_attn.k_norm.weight if hasattr(self.self_attn, "k_norm") else None

    def qkv(self, h: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        return stacked_linear(h, (a.q_proj, a.k_proj, a.v_proj))

    def o(self, y: torch.Tensor) -> torch.Tensor:
        return self.self_attn.o_proj(y)

    def gate_up(self, h: torch.Tensor) -> torch.Tensor:
        return stacked_linear(h, (self.mlp.gate_proj, self.mlp.up_proj))

    def down(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(h)


class Backbone(nn.Module):
    """Embeddings, the decoder layers and the final norm: transformers' `LlamaModel`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """The causal LM: `forward(input_ids) -> logits` of shape (batch, time, vocab)."""

    hf_head = "ForCausalLM"  # transformers' class is the family's name + this (model/hf.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases; residual output projections scaled by
        1/sqrt(2 * layers) so the residual stream's variance does not grow with depth (GPT-2)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                nn.init.normal_(p, 0.0, std)
        cos, sin = rope_tables(self.config, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                token_logprobs: bool = False, temperature: float = 1.0) -> torch.Tensor:
        """Logits for `input_ids` placed at positions [start_pos, start_pos + T).

        `start_pos` is an int, or a (B,) tensor giving each row its own start (rows of a batch
        at different lengths, as an inference engine decodes them).
        `cache` holds keys/values of earlier positions (and receives the new ones).
        `attention_mask` (bool, True = may attend, broadcastable to (B, heads, T, start_pos + T))
        overrides the default causal mask, e.g. to keep packed documents apart.
        With `targets` (B, T; -100 = ignore) it returns instead the *summed* next-token
        cross-entropy, computed without materializing the logits (see linear_ce.py); with
        `token_logprobs` as well, each position's log-prob of its target (B, T), 0 where it is -100
        (what preference losses sum per answer), again without the logits, of logits / `temperature`
        (an RL policy's log-probs are those of the distribution it sampled from).
        """
        x = self.hidden_states(input_ids, start_pos, cache, attention_mask)
        if targets is not None and token_logprobs:
            # logits / T = (x / T) W^T: the temperature goes into the fused head's input.
            x = x / temperature if temperature != 1.0 else x
            return linear_token_logprobs(x.reshape(-1, x.shape[-1]), self.lm_head.weight,
                                         targets.reshape(-1)).view(targets.shape)
        if targets is not None:
            return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
        return self.lm_head(x)

    def hidden_states(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's output after the final norm (B, T, hidden): what a head reads (transformers'
        `last_hidden_state`). Arguments as `forward`'s."""
        T = input_ids.shape[1]
        last = int(start_pos.max()) + T if isinstance(start_pos, torch.Tensor) else start_pos + T
        if last > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {last} exceed max_position_embeddings "
                             f"= {self.config.max_position_embeddings}")
        x = sdpa_layers(self.model.embed_tokens(input_ids), self.model.layers, self.config, TRAINING_KERNELS,
                        self.rope_cos, self.rope_sin, start_pos, cache, attention_mask)
        return self.model.norm(x)
