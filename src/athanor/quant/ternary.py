"""TQ2_0: ternary weights, about 2 bits each (ggml's `block_tq2_0`, from llama.cpp's BitNet b1.58 support).

A block of 256 weights holds one fp16 scale d = max |x| and codes q = roundf(x / d) in {-1, 0, 1},
stored as q + 1 in 2 bits: 64 bytes of codes, then d (2 + 64 bytes, 2.06 bits per weight). Byte j
of each 128-weight half packs weights j, j + 32, j + 64 and j + 96 of that half into bits 0-1,
2-3, 4-5 and 6-7. Rounding follows ggml's reference (`quantize_row_tq2_0_ref`), so the bytes equal
`gguf.quants`'; there is no scale search to weight, so importance weights are ignored. Made for
models trained ternary (BitNet b1.58); a float-trained model loses most of its quality.
"""

from __future__ import annotations

import torch

from athanor.quant.formats import f16_bytes, f16_from

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
_HALF_BELOW = 0.49999997  # the largest float32 below 0.5: trunc(v + copysign(it, v)) is roundf(v)


def quantize_tq2_0(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """(n, 256) float32 -> (n, 66) uint8."""
    d = x.abs().amax(1, keepdim=True)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    v = x * inv
    q = (torch.trunc(v + torch.copysign(torch.tensor(_HALF_BELOW), v)).to(torch.int8) + 1).view(torch.uint8)
    packed = (q.view(-1, 2, 4, 32) << _SHIFTS).sum(2, dtype=torch.uint8)  # disjoint bits: sum == or
    return torch.cat([packed.view(-1, 64), f16_bytes(d)], dim=1)


def dequantize_tq2_0(b: torch.Tensor) -> torch.Tensor:
    """(n, 66) uint8 -> (n, 256) float32."""
    q = ((b[:, :64].reshape(-1, 2, 1, 32) >> _SHIFTS) & 3).reshape(-1, 256).to(torch.int8) - 1
    return f16_from(b[:, 64:]) * q.float()


TERNARY = {"TQ2_0": (quantize_tq2_0, dequantize_tq2_0)}
