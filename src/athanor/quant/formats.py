"""GGML block formats: quantize and dequantize, vectorized with torch.

A quantized row is a run of fixed-size blocks, each holding its own scale(s) and packed integer
codes. The byte layouts mirror ggml's (`ggml-common.h`; types and ids as in the GGUF spec), so
blocks written here go into a GGUF file as they are and llama.cpp reads them.

The legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) round exactly as ggml's reference C code does
(`quantize_row_*_ref`), hence bit-exact with it and with `gguf.quants`; every step is a separate
float32 operation in the same order (no fused multiply-add), which is what makes that hold.
The K-quants (super-blocks of 256 with quantized sub-block scales) search their scales instead:
see `kquants.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from athanor.errors import AthanorError

QK_K = 256  # K-quant super-block size


@dataclass(frozen=True)
class QuantType:
    """One GGML tensor type: its id in GGUF files, elements per block and bytes per block."""

    name: str
    ggml_id: int
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


# The GGML type table (ids from ggml.h; sizes from the block structs in ggml-common.h).
TYPES: dict[str, QuantType] = {t.name: t for t in [
    QuantType("F32", 0, 1, 4),
    QuantType("F16", 1, 1, 2),
    QuantType("Q4_0", 2, 32, 2 + 16),                                # d, 32 x 4-bit
    QuantType("Q4_1", 3, 32, 2 + 2 + 16),                            # d, m, 32 x 4-bit
    QuantType("Q5_0", 6, 32, 2 + 4 + 16),                            # d, high bits, low nibbles
    QuantType("Q5_1", 7, 32, 2 + 2 + 4 + 16),                        # d, m, high bits, low nibbles
    QuantType("Q8_0", 8, 32, 2 + 32),                                # d, 32 x int8
    QuantType("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),     # scales|mins, 2-bit, d, dmin
    QuantType("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),     # high bits, 2-bit, 6-bit scales, d
    QuantType("Q4_K", 12, QK_K, 2 + 2 + 12 + QK_K // 2),             # d, dmin, 6-bit scales/mins, 4-bit
    QuantType("Q5_K", 13, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # ... plus high bits
    QuantType("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # low 4, high 2, int8 scales, d
]}
TYPES_BY_ID = {t.ggml_id: t for t in TYPES.values()}


def get_type(name: str) -> QuantType:
    t = TYPES.get(name.upper())
    if t is None:
        raise AthanorError(f"unknown tensor type {name!r} (known: {', '.join(TYPES)})", field="type")
    return t


# -- small helpers shared with kquants.py ----------------------------------------------------

def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) uint8, rounded to half precision (round to nearest even, as ggml)."""
    return x.to(torch.float16).flatten().view(torch.uint8).view(-1, 2)


def f16_from(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 2k) codes < 16 -> (n, k) bytes: the first half in the low nibbles, the second in the high."""
    k = q.shape[-1] // 2
    return q[..., :k] | (q[..., k:] << 4)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(n, 32) of 0/1 -> (n, 4) bytes, element j in bit j % 8 of byte j // 8 (a little-endian uint32)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return (bits.view(bits.shape[0], 4, 8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(b: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], -1)


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """roundf (half away from zero), as floor(|x|) + floor(2 * frac) to match ggml's numpy twin exactly."""
    a = x.abs()
    fl = a.floor()
    return torch.sign(x) * (fl + (2 * (a - fl)).floor())


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The entry of largest magnitude, with its sign (the first one on ties), shape (n, 1)."""
    return torch.gather(x, 1, x.abs().argmax(dim=1, keepdim=True))


# -- legacy block types (32 weights per block) ------------------------------------------------

def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(x * _safe_inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([f16_bytes(d), q], dim=1)


def _dq8_0(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _sym_codes(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = signed max / -(levels/2), codes trunc(x/d + levels/2 + 0.5) in [0, levels)."""
    half = levels // 2
    d = _signed_absmax(x) / -half
    q = torch.trunc(x * _safe_inverse(d) + (half + 0.5)).clamp(0, levels - 1).to(torch.uint8)
    return d, q


def _affine_codes(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: x ~ d * q + m with m the block minimum, codes trunc((x - m)/d + 0.5)."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d = (hi - lo) / (levels - 1)
    q = torch.trunc((x - lo) * _safe_inverse(d) + 0.5).clamp(0, levels - 1).to(torch.uint8)
    return d, lo, q


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _sym_codes(x, 16)
    return torch.cat([f16_bytes(d), pack_nibbles(q)], dim=1)


def _dq4_0(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * (unpack_nibbles(b[:, 2:]).float() - 8)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    d, m, q = _affine_codes(x, 16)
    return torch.cat([f16_bytes(d), f16_bytes(m), pack_nibbles(q)], dim=1)


def _dq4_1(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * unpack_nibbles(b[:, 4:]).float() + f16_from(b[:, 2:4])


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _sym_codes(x, 32)
    return torch.cat([f16_bytes(d), pack_bits(q >> 4), pack_nibbles(q & 0x0F)], dim=1)


def _q5_codes(b: torch.Tensor) -> torch.Tensor:
    return unpack_nibbles(b[:, -16:]) | (unpack_bits(b[:, -20:-16]) << 4)


def _dq5_0(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * (_q5_codes(b).float() - 16)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    d, m, q = _affine_codes(x, 32)
    return torch.cat([f16_bytes(d), f16_bytes(m), pack_bits(q >> 4), pack_nibbles(q & 0x0F)], dim=1)


def _dq5_1(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * _q5_codes(b).float() + f16_from(b[:, 2:4])


# Per type: quantize (blocks (n, block_size) float32, importance (n, block_size) or None)
# -> (n, type_size) uint8, and dequantize back. The legacy types ignore the importance
# weights: their reference rounding has no search to weight.
Quantizer = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Dequantizer = Callable[[torch.Tensor], torch.Tensor]
_LEGACY: dict[str, tuple[Quantizer, Dequantizer]] = {
    "Q8_0": (lambda x, w: _q8_0(x), _dq8_0),
    "Q4_0": (lambda x, w: _q4_0(x), _dq4_0),
    "Q4_1": (lambda x, w: _q4_1(x), _dq4_1),
    "Q5_0": (lambda x, w: _q5_0(x), _dq5_0),
    "Q5_1": (lambda x, w: _q5_1(x), _dq5_1),
}


def _codec(t: QuantType) -> tuple[Quantizer, Dequantizer]:
    if t.name in _LEGACY:
        return _LEGACY[t.name]
    from athanor.quant.kquants import KQUANTS

    return KQUANTS[t.name]


# Rows are processed in chunks small enough that every temporary stays in cache-sized buffers
# (large ones cost a page-fault storm per op): measured best at 64K weights for the legacy
# types and 16K for the K-quants, whose search holds (blocks x 41 candidates x elements).
_CHUNK_ELEMENTS = {32: 1 << 16, QK_K: 1 << 14}


def quantize(weight: torch.Tensor, qtype: str | QuantType, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize a 2-D (rows, cols) float tensor row by row: returns (rows, bytes per row) uint8.

    `importance` (cols,) weighs each input column's squared error in the K-quant scale search
    (an importance matrix: the mean squared activation feeding that column).
    """
    t = qtype if isinstance(qtype, QuantType) else get_type(qtype)
    w2 = weight.detach().to("cpu", torch.float32)
    if w2.dim() == 1:
        w2 = w2.unsqueeze(0)
    rows, cols = w2.shape
    if t.name == "F32":
        return w2.contiguous().view(torch.uint8)
    if t.name == "F16":
        return w2.to(torch.float16).contiguous().view(torch.uint8)
    if cols % t.block_size:
        raise AthanorError(f"a row of {cols} values does not split into {t.name} blocks of {t.block_size}",
                           field="type")
    quant, _ = _codec(t)
    per_row = cols // t.block_size
    out = torch.empty(rows, per_row * t.type_size, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMENTS[t.block_size] // cols)
    imp = None
    if importance is not None:
        imp = importance.detach().to("cpu", torch.float32).reshape(1, per_row, t.block_size)
    for r in range(0, rows, step):
        chunk = w2[r:r + step]
        n = chunk.shape[0]
        w = None if imp is None else imp.expand(n, -1, -1).reshape(n * per_row, t.block_size)
        out[r:r + n] = quant(chunk.reshape(n * per_row, t.block_size), w).view(n, -1)
    return out


def dequantize(data: torch.Tensor, qtype: str | QuantType, cols: int) -> torch.Tensor:
    """(rows, bytes per row) uint8 -> (rows, cols) float32."""
    t = qtype if isinstance(qtype, QuantType) else get_type(qtype)
    data = data.reshape(-1, cols // t.block_size * t.type_size)
    rows = data.shape[0]
    if t.name == "F32":
        return data.contiguous().view(torch.float32).reshape(rows, cols)
    if t.name == "F16":
        return data.contiguous().view(torch.float16).float().reshape(rows, cols)
    _, dequant = _codec(t)
    return dequant(data.reshape(-1, t.type_size)).reshape(rows, cols)
