"""GGML block formats: quantize and dequantize, vectorized with torch.

A quantized row is a run of fixed-size blocks, each holding its own scale(s) and packed integer
codes. The byte layouts mirror ggml's (`ggml-common.h`; types and ids as in the GGUF spec), so
blocks written here go into a GGUF file as they are and llama.cpp reads them.

The legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) round exactly as ggml's reference C code does
(`quantize_row_*_ref`), hence bit-exact with it and with `gguf.quants`: see `legacy.py`.
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
    QuantType("TQ2_0", 35, QK_K, QK_K // 4 + 2),                    # ternary 2-bit codes, then d
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


def unpack_bits(b: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], -1)


# -- legacy block types (32 weights per block) ------------------------------------------------

def _dq8_0(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _dq4_0(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * (unpack_nibbles(b[:, 2:]).float() - 8)


def _dq4_1(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * unpack_nibbles(b[:, 4:]).float() + f16_from(b[:, 2:4])


def _q5_codes(b: torch.Tensor) -> torch.Tensor:
    return unpack_nibbles(b[:, -16:]) | (unpack_bits(b[:, -20:-16]) << 4)


def _dq5_0(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * (_q5_codes(b).float() - 16)


def _dq5_1(b: torch.Tensor) -> torch.Tensor:
    return f16_from(b[:, :2]) * _q5_codes(b).float() + f16_from(b[:, 2:4])


# Per type: quantize (blocks (n, block_size) float32, importance (n, block_size) or None)
# -> (n, type_size) uint8, and dequantize back. The legacy types quantize in legacy.py, into
# the output in place; they take no importance weights: their reference rounding has no search.
Quantizer = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Dequantizer = Callable[[torch.Tensor], torch.Tensor]
_LEGACY_DEQUANT: dict[str, Dequantizer] = {
    "Q8_0": _dq8_0, "Q4_0": _dq4_0, "Q4_1": _dq4_1, "Q5_0": _dq5_0, "Q5_1": _dq5_1,
}


def _block_codec(t: QuantType) -> tuple[Quantizer, Dequantizer]:
    """The K-quants' and TQ2_0's (super-blocks of 256) quantizer and dequantizer."""
    from athanor.quant.kquants import KQUANTS
    from athanor.quant.ternary import TERNARY

    return KQUANTS[t.name] if t.name in KQUANTS else TERNARY[t.name]


def _dequantizer(t: QuantType) -> Dequantizer:
    return _LEGACY_DEQUANT[t.name] if t.name in _LEGACY_DEQUANT else _block_codec(t)[1]


# The K-quants work in chunks of rows of 16K weights, so that temporaries stay in cache: their
# search holds (blocks x 41 candidates x elements). (The legacy types chunk in legacy.py.)
_KQUANT_CHUNK_ELEMENTS = 1 << 14


def _quantize_legacy(w2: torch.Tensor, t: QuantType, out: torch.Tensor, compile: bool) -> None:
    blocks, out_blocks = w2.contiguous().view(-1, 32), out.view(-1, t.type_size)
    if compile:  # one compiled graph over the whole tensor: no chunks (see compiled.py)
        from athanor.quant import compiled as quantizer
    else:
        from athanor.quant import legacy as quantizer
    quantizer.quantize_blocks(t.name, blocks, out_blocks)


def quantize(weight: torch.Tensor, qtype: str | QuantType, importance: torch.Tensor | None = None,
             compile: bool = False) -> torch.Tensor:
    """Quantize a 2-D (rows, cols) float tensor row by row: returns (rows, bytes per row) uint8.

    `importance` (cols,) weighs each input column's squared error in the K-quant scale search
    (an importance matrix: the mean squared activation feeding that column). `compile=True`
    quantizes the legacy types with `torch.compile`d graphs (`compiled.py`): the same bytes,
    about twice as fast, after a compile of seconds per type (more on a cold inductor cache);
    other types ignore it.
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
    per_row = cols // t.block_size
    out = torch.empty(rows, per_row * t.type_size, dtype=torch.uint8)
    if t.name in _LEGACY_DEQUANT:
        _quantize_legacy(w2, t, out, compile)
        return out
    quant = _block_codec(t)[0]
    step = max(1, _KQUANT_CHUNK_ELEMENTS // cols)
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
    return _dequantizer(t)(data.reshape(-1, t.type_size)).reshape(rows, cols)
