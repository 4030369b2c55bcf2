"""The decoder layer's math, written once for every path that runs it.

A Llama-family layer is: RMSNorm -> q|k|v projection -> (Qwen3: RMSNorm over each q and k head)
-> rotary positions -> grouped-query attention -> output projection -> residual; RMSNorm ->
SwiGLU MLP -> residual. `decoder_layer` below is that sequence and nothing else. What it leaves
to its caller is *how* each part runs, which differs by path but not by architecture:

- the projections are the layer's own (`LayerParts`): the training model's `nn.Linear` modules
  (so LoRA, quantized layers and hooks take part), or serve/fast.py's stacked, transposed copies;
- the elementwise kernels (`Kernels`): for training, functions with hand-written backward passes
  (model/fused.py) that normalize in fp32 under bf16 autocast; for inference, the plain ops
  with the fewest dispatches;
- attention over the cache (`attend`): SDPA over a `KVCache` (`sdpa_layers`, the model's forward
  and the fast path's eager one), or the compiled decode step's attention over a read-only cache
  view plus the new keys.

A new family (or an MoE MLP) changes this file and the module that names its weights, and every
path runs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from athanor.model.llama import KVCache, ModelConfig


class LayerParts(Protocol):
    """One decoder layer's weights as the math uses them: norm weights, and projections as calls.
    Paths run a layer as `layer(x, config, kernels, cos, sin, attend)`, which is `decoder_layer` on
    itself: for the model's `nn.Module` layers that is a module call, so hooks on the layer run (FSDP2
    gathers its sharded weights there)."""

    def __call__(self, x: torch.Tensor, config: ModelConfig, kernels: Kernels, cos: torch.Tensor,
                 sin: torch.Tensor, attend: Attend) -> torch.Tensor: ...

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3's per-head norms; None for the others
    k_norm: torch.Tensor | None

    def qkv(self, h: torch.Tensor) -> torch.Tensor:
        """q|k|v stacked on the last axis: (..., (heads + 2 kv_heads) * head_dim)."""

    def o(self, y: torch.Tensor) -> torch.Tensor: ...

    def gate_up(self, h: torch.Tensor) -> torch.Tensor:
        """gate|up stacked on the last axis: (..., 2 * intermediate_size)."""

    def down(self, h: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Kernels:
    """How the elementwise parts run:
    - `norm(x, (d,), weight, eps)`: RMSNorm over the last axis (`F.rms_norm`'s signature);
    - `rope(qkv, cos, sin, n_q, n_kv)`: q, k, v (..., T, heads, head_dim) from the stacked heads
      (..., T, n_q + 2 n_kv, head_dim), q and k rotated by the path's cos/sin tables;
    - `swiglu(gate_up)`: silu(gate) * up."""

    norm: Callable[[torch.Tensor, tuple[int], torch.Tensor, float], torch.Tensor]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    swiglu: Callable[[torch.Tensor], torch.Tensor]


# attend(q, k, v): q (B, T, heads, head_dim), k and v (B, T, kv_heads, head_dim) of the new tokens;
# returns the attention output (B, T, heads * head_dim), after storing or reading whatever cache it keeps.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_layer(x: torch.Tensor, layer: LayerParts, config: ModelConfig, kernels: Kernels,
                  cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
    """The residual stream x (B, T, hidden) after one decoder layer."""
    H, Hkv, hd, eps = config.num_attention_heads, config.num_key_value_heads, config.dim_per_head, config.rms_norm_eps
    d = (x.shape[-1],)
    qkv = layer.qkv(kernels.norm(x, d, layer.input_norm, eps)).view(*x.shape[:-1], H + 2 * Hkv, hd)
    if config.qk_norm:  # Qwen3: every q and k head normalized over head_dim before the rotation
        q, k, v = qkv.split([H, Hkv, Hkv], dim=-2)
        qkv = torch.cat([kernels.norm(q, (hd,), layer.q_norm, eps), kernels.norm(k, (hd,), layer.k_norm, eps), v],
                        dim=-2)
    x = x + layer.o(attend(*kernels.rope(qkv, cos, sin, H, Hkv)))
    return x + layer.down(kernels.swiglu(layer.gate_up(kernels.norm(x, d, layer.post_norm, eps))))


def sdpa_layers(x: torch.Tensor, layers: Sequence[LayerParts], config: ModelConfig, kernels: Kernels,
                cos_table: torch.Tensor, sin_table: torch.Tensor, start_pos: int | torch.Tensor,
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
    """The residual stream after all `layers`, for new tokens at positions [start_pos, start_pos + T)
    (`start_pos` one int, or a (B,) tensor of per-row starts); attention is SDPA over `cache`
    (None: these tokens alone), which receives the new keys/values. `cos_table`/`sin_table`
    (positions, head_dim) are the kernels' rotary tables; `mask` (bool, True = may attend)
    overrides the causal one."""
    B, T = x.shape[:2]
    if isinstance(start_pos, torch.Tensor):
        pos = start_pos[:, None] + torch.arange(T, device=x.device)  # (B, T)
        cos, sin = cos_table[pos][:, :, None], sin_table[pos][:, :, None]  # (B, T, 1, head_dim)
        if mask is None:  # row b's query i sees keys up to its own position start_b + i
            mask = (torch.arange(int(start_pos.max()) + T, device=x.device) <= pos[..., None])[:, None]
    else:
        cos, sin = cos_table[start_pos:start_pos + T, None], sin_table[start_pos:start_pos + T, None]  # (T, 1, hd)
        if mask is None and start_pos > 0 and T > 1:  # new tokens see the cached prefix and, causally, each other
            j = torch.arange(start_pos + T, device=x.device)
            mask = j[None, :] <= j[start_pos:, None]
    gqa = config.num_key_value_heads != config.num_attention_heads

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(i, k, v, start_pos)
        # Causal without a cache (or from position 0); the explicit mask when new tokens see a
        # cached prefix. Each group of heads / kv_heads query heads shares one k/v head.
        causal = mask is None and k.shape[2] == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B, T, -1)

    for i, layer in enumerate(layers):
        x = layer(x, config, kernels, cos, sin, functools.partial(attend, i))
    return x
