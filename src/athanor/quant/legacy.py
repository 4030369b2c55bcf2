"""The legacy GGML block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): 32 weights per block.

Quantization rounds exactly as ggml's reference C code (`quantize_row_*_ref` in ggml-quants.c)
and its numpy twin `gguf.quants`, bit for bit: every float step is a separate float32 operation
in the reference's order (no fused multiply-add). What differs is how the work is arranged, for
speed on a CPU where each eager torch op costs microseconds and comparisons or `where` cost
10-25 us even on 8K elements (measured here):

- few full passes over the weights, each writing into preallocated buffers;
- the signed absolute maximum of Q4_0/Q5_0 from `amax` and `amin` (plain float reductions)
  instead of abs + argmax + gather; only blocks where the two tie in magnitude, whose sign the
  reference takes from the first such element, go through argmax;
- roundf (half away from zero, Q8_0) as trunc(v + copysign(0.49999997, v)): adding the largest
  float32 below 0.5 equals roundf for every float32 (checked exhaustively over |v| <= 130,
  Q8_0's range) where adding 0.5 misrounds 0.49999997;
- codes converted once to int8, then packed with shifts and ors on 16-bit views (two codes per
  element), written straight into the output blocks; Q5's 32 high bits gathered eight at a time
  with one 64-bit multiply (byte i of a word holding bit 0 lands in bit 56 + i).

Shapes: a chunk of blocks `x` (n, 32) float32 is quantized into `out` (n, type_size) uint8, a
view of the caller's output, with `buf` (n, 32) float32 and `scratch` (n, 32) int32 reused
across chunks (fresh buffers per chunk would cost page faults).
"""

from __future__ import annotations

import torch

_HALF_BELOW_BITS = 0x3EFFFFFF  # float32 0.49999997 = 0.5 - 2**-25, the largest float32 below 0.5
_SIGN_BIT = -(2**31)
_LOW_NIBBLES = 0x0F0F
_BIT0_OF_EACH_BYTE = 0x0101010101010101
_GATHER_BYTES = 0x0102040810204080  # sum of 2**(7k), k = 1..8: moves byte i's bit 0 to bit 56 + i


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (the reference's `id = d ? 1/d : 0`)."""
    inv = torch.reciprocal(d)
    if torch.count_nonzero(d) < d.numel():  # comparisons are slow: only when a zero is present
        inv = torch.where(d == 0, torch.zeros_like(d), inv)
    return inv


def _write_f16(out: torch.Tensor, col: int, v: torch.Tensor) -> None:
    """v (n,) rounded to fp16 into bytes col, col+1 of every block."""
    out.view(torch.float16)[:, col // 2].copy_(v)


def _codes(buf: torch.Tensor, scratch: torch.Tensor, levels: int) -> torch.Tensor:
    """trunc(buf) clamped to levels - 1, as (n, 32) int8 in scratch (buf >= 0 here: no lower clamp)."""
    codes = scratch.view(-1).view(torch.int8)[:buf.numel()].view(buf.shape)
    return codes.copy_(buf).clamp_max_(levels - 1)


def _pack_nibbles(codes: torch.Tensor, out: torch.Tensor, col: int, mask: bool) -> None:
    """Low nibbles of codes 0..15 in bytes col..col+15, codes 16..31 in the high nibbles.

    On 16-bit views each element holds two neighbouring codes; shifting it by 4 keeps each
    nibble in its own byte once the codes are below 16 (masked first for the 5-bit types).
    """
    c16 = codes.view(torch.int16)
    if mask:
        c16 = c16 & _LOW_NIBBLES
    torch.bitwise_or(c16[:, :8], (c16 << 4)[:, 8:], out=out.view(torch.int16)[:, col // 2:col // 2 + 8])


def _pack_high_bits(codes: torch.Tensor, out: torch.Tensor, col: int) -> None:
    """Bit 4 of the 32 codes as one little-endian uint32 at bytes col..col+3 (ggml's qh)."""
    bits = (codes.view(torch.int64) >> 4).bitwise_and_(_BIT0_OF_EACH_BYTE)
    qh = bits.mul_(_GATHER_BYTES).bitwise_right_shift_(56).to(torch.uint8).view(torch.int32).view(-1)
    out16 = out.view(torch.int16)
    out16[:, col // 2].copy_(qh)  # int32 -> int16 keeps the low half
    out16[:, col // 2 + 1].copy_(qh >> 16)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per block, the element of largest magnitude with its sign (the first one on ties), (n,)."""
    mx, mn = x.amax(1), x.amin(1)
    total = mx + mn  # > 0: the maximum wins, < 0: the minimum; 0 exactly when |mx| == |mn|
    s = torch.copysign(torch.maximum(mx, -mn), total)
    if torch.count_nonzero(total) < total.numel():
        tied = (total == 0).nonzero().view(-1)
        xt = x[tied]
        s[tied] = torch.gather(xt, 1, xt.abs().argmax(1, keepdim=True)).view(-1)
    return s


def q8_0(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor) -> None:
    """d = max|x| / 127, q = roundf(x / d) as int8."""
    d = torch.abs(x, out=buf).amax(1) / 127
    torch.mul(x, _inverse(d).unsqueeze(1), out=buf)
    # copysign by bits: the sign bit of each value ORed into 0.49999997
    torch.bitwise_and(buf.view(torch.int32), _SIGN_BIT, out=scratch)
    buf.add_(scratch.bitwise_or_(_HALF_BELOW_BITS).view(torch.float32))
    out[:, 2:].view(torch.int8).copy_(buf)
    _write_f16(out, 0, d)


def _symmetric(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor, levels: int) -> None:
    """Q4_0/Q5_0: d = signed max / -(levels/2), q = trunc(x/d + levels/2 + 0.5) clamped."""
    half = levels // 2
    d = _signed_absmax(x) / -half
    torch.mul(x, _inverse(d).unsqueeze(1), out=buf).add_(half + 0.5)
    codes = _codes(buf, scratch, levels)
    _write_f16(out, 0, d)
    if levels == 32:
        _pack_high_bits(codes, out, 2)
    _pack_nibbles(codes, out, 2 if levels == 16 else 6, mask=levels == 32)


def _affine(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor, levels: int) -> None:
    """Q4_1/Q5_1: x ~ d * q + m with m the block minimum, q = trunc((x - m)/d + 0.5) clamped."""
    lo, hi = x.amin(1), x.amax(1)
    d = (hi - lo) / (levels - 1)
    torch.sub(x, lo.unsqueeze(1), out=buf).mul_(_inverse(d).unsqueeze(1)).add_(0.5)
    codes = _codes(buf, scratch, levels)
    _write_f16(out, 0, d)
    _write_f16(out, 2, lo)
    if levels == 32:
        _pack_high_bits(codes, out, 4)
    _pack_nibbles(codes, out, 4 if levels == 16 else 8, mask=levels == 32)


def q4_0(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor) -> None:
    _symmetric(x, out, buf, scratch, 16)


def q5_0(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor) -> None:
    _symmetric(x, out, buf, scratch, 32)


def q4_1(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor) -> None:
    _affine(x, out, buf, scratch, 16)


def q5_1(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor) -> None:
    _affine(x, out, buf, scratch, 32)


QUANTIZERS = {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1}

# Blocks go in chunks so that temporaries stay in cache, with scratch buffers reused across
# chunks: 512K weights measured best of 128K-512K (each eager op costs microseconds per chunk,
# against 2 MiB buffers in L2).
CHUNK_BLOCKS = 1 << 14


def quantize_blocks(name: str, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Quantize blocks (n, 32) float32 into out (n, type_size) uint8 with type `name`'s quantizer."""
    quant = QUANTIZERS[name]
    step = min(CHUNK_BLOCKS, blocks.shape[0])
    buf, scratch = torch.empty(step, 32), torch.empty(step, 32, dtype=torch.int32)
    for b in range(0, blocks.shape[0], step):
        x = blocks[b:b + step]
        n = x.shape[0]
        quant(x, out[b:b + n], buf[:n], scratch[:n])
