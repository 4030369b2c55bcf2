"""The legacy block types quantized by `torch.compile`d graphs: opt-in, bit-exact, 2-3x eager.

`legacy.py` spends most of its time in per-op overhead and in re-reading the weights once per
eager op. Here each type is one graph that inductor turns into one C++ kernel of three loops
over the blocks (OpenMP across blocks when torch has threads): the block statistics (AVX
vectors within a block, then a horizontal reduction), d and 1/d (vectors across 16 blocks), and
the codes, packed, with Q5's high bits (vectors within a block). Inductor would also fuse the
three into one loop (it does when no output is computed across blocks), which measured 2x
slower: each block then waits on its own reductions and divisions, where separate loops overlap
independent blocks. The outputs come back as the packed code bytes plus one column per 16-bit
header field, and strided copies put them into the GGML blocks. (Returned apart, not
concatenated in the graph: inductor's CPU concatenation of bytes falls back to an eager op, and
an int16 concatenation writes the header with strided scalar stores, which merges the loops.)

Bit-exactness with ggml's reference (`quantize_row_*_ref`, and `gguf.quants`) rests on:
- every float step being the reference's own float32 operation, in its order: inductor on CPU
  keeps `a / b` a division (it turns division by a constant into a multiplication only on
  GPUs), so the divisors are passed in as tensors all the same, and the C++ compiler is told
  not to contract a multiply and an add into an FMA (`-ffp-contract=off`, pinned below
  against the environment variable that changes it, with unsafe math optimizations off);
- roundf (Q8_0) as trunc(v + copysign(0.49999997, v)), exact for every float32 as in `legacy.py`;
- the sign of Q4_0/Q5_0's scale: the element of largest magnitude is the block maximum when
  max + min > 0 and the minimum when < 0; blocks where the two tie (max + min == 0, all-zero
  blocks included), whose sign the reference takes from the first such element, are rare and
  redone by `legacy.py`.

A graph compiles once per type and process (measured: ~1.5 s per type on a cold inductor cache
plus ~11 s of dynamo/inductor start-up for the first; ~0.2 s warm), with the number of blocks
dynamic. Tensors of fewer than `MIN_BLOCKS` blocks go to `legacy.py`: dynamo would specialize
sizes 0 and 1 into graphs of their own, and a call's fixed cost dominates so few weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from athanor.errors import AthanorError
from athanor.quant import legacy

MIN_BLOCKS = 64
_HALF_BELOW = 0.49999997  # float32 0x3EFFFFFF, the largest float32 below 0.5 (see legacy.py)
_INVERSE_OVERFLOWS = 2.0**-128  # 1/d is inf in float32 exactly for 0 <= d <= this (a denormal)
_OPTIONS = {"cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False}


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _q8_0(x: torch.Tensor, divisor: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    d = x.abs().amax(1, keepdim=True) / divisor
    # Where 1/d overflows to inf (d <= 2**-128: zero or a denormal), the reference's codes are
    # conversions of NaN and inf to int8, which come out 0 (C on x86, numpy, eager torch) but 0x80
    # from inductor's vector conversion; an inverse of 0 gives those zeros (d is 0 in fp16, so
    # the block reads 0 either way). The same one comparison as `_inverse`'s d == 0.
    inv = torch.where(d <= _INVERSE_OVERFLOWS, torch.zeros_like(d), 1 / d)
    v = x * inv
    q = torch.trunc(v + torch.copysign(torch.full_like(v, _HALF_BELOW), v)).to(torch.int8)
    return (d.to(torch.float16), q), inv


def _nibbles_and_high_bits(code: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                           levels: int) -> tuple[torch.Tensor, ...]:
    """Codes 0..15 in the low nibbles and 16..31 in the high ones, (n, 16) uint8; for 5-bit codes
    first bit 4 of codes 0..15 and of 16..31, (n, 1) int32 each (the two halves of ggml's qh).

    The codes are computed per half straight from x (no (n, 32) code tensor to re-read). The
    bits are gathered by a float sum of distinct powers of two below 2**16, exact in any order:
    inductor's vectorized horizontal sum exists for floats, its integer one is a scalar loop.
    A clear bit contributes the packed byte times zero, not a constant zero: reading the packed
    codes makes the sums their consumers, so inductor computes them in the loop that packs them,
    from codes still in registers. Without that read it stored the codes 16..31 as an (n, 16)
    int32 tensor (16 MiB for 8M weights) and summed them in a loop of its own: Q5_0 and Q5_1
    were ~15-20% slower (measured, one thread).
    """
    lo, hi = code(x[:, :16]), code(x[:, 16:])
    packed = (lo & 0xF | ((hi & 0xF) << 4)).to(torch.uint8)
    if levels == 16:
        return (packed,)
    powers = (1 << torch.arange(16, dtype=torch.int32, device=x.device)).to(torch.float32)
    zero = packed.to(torch.float32) * 0.0
    # bit 4 of the integer code, as the reference's int8 has it even for a negative code (a
    # subnormal d rounded down), where testing the float (v >= 16) would clear it
    qh = [torch.where((c & 16) != 0, powers, zero).sum(1, keepdim=True).to(torch.int32) for c in (lo, hi)]
    return (*qh, packed)


def _symmetric(x: torch.Tensor, divisor: torch.Tensor, levels: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Q4_0/Q5_0; the last output, max + min per block, is 0 where the sign needs `legacy.py`."""
    mx, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    total = mx + mn
    d = torch.where(total > 0, mx, mn) / divisor
    inv = _inverse(d)

    def code(xs: torch.Tensor) -> torch.Tensor:
        return torch.trunc(xs * inv + (levels // 2 + 0.5)).to(torch.int32).clamp_max(levels - 1)

    return (d.to(torch.float16), *_nibbles_and_high_bits(code, x, levels), total), inv


def _affine(x: torch.Tensor, divisor: torch.Tensor, levels: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Q4_1/Q5_1."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (hi - lo) / divisor
    inv = _inverse(d)

    def code(xs: torch.Tensor) -> torch.Tensor:
        return torch.trunc((xs - lo) * inv + 0.5).to(torch.int32).clamp_max(levels - 1)

    return (d.to(torch.float16), lo.to(torch.float16), *_nibbles_and_high_bits(code, x, levels)), inv


# Per type: the graph, its divisor (the reference's d = ... / divisor) and whether the graph's
# last output flags blocks for `legacy.py`. Each graph returns its outputs and 1/d per block,
# which the caller drops: as an output, 1/d is computed once in the loop vectorized across
# blocks, where otherwise the loop over each block's codes recomputed it with two scalar
# divisions per block (measured 3-7% faster for the 4- and 5-bit types, neutral for Q8_0).
_Graph = Callable[..., tuple[tuple[torch.Tensor, ...], torch.Tensor]]
_GRAPHS: dict[str, tuple[_Graph, float, bool]] = {
    "Q8_0": (_q8_0, 127.0, False),
    "Q4_0": (lambda x, divisor: _symmetric(x, divisor, 16), -8.0, True),
    "Q5_0": (lambda x, divisor: _symmetric(x, divisor, 32), -16.0, True),
    "Q4_1": (lambda x, divisor: _affine(x, divisor, 16), 15.0, False),
    "Q5_1": (lambda x, divisor: _affine(x, divisor, 32), 31.0, False),
}
_compiled: dict[str, _Graph] = {}


def cxx_available() -> bool:
    """Whether inductor finds the C++ compiler it builds the graphs with (g++, or $CXX)."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return False
    return True


def _graph(name: str) -> _Graph:
    if name not in _compiled:
        if not cxx_available():
            raise AthanorError("compile=True (--compile) needs a C++ compiler for torch.compile (g++, or one "
                               "named by $CXX); install one or quantize without it (same bytes)", field="compile")
        _compiled[name] = torch.compile(_GRAPHS[name][0], dynamic=False, options=_OPTIONS)
    return _compiled[name]


def quantize_blocks(name: str, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Quantize blocks (n, 32) float32 (contiguous) into out (n, type_size) uint8 (contiguous)."""
    n = blocks.shape[0]
    if n < MIN_BLOCKS:
        legacy.quantize_blocks(name, blocks, out)
        return
    _, divisor, flags_ties = _GRAPHS[name]
    torch._dynamo.mark_dynamic(blocks, 0)  # one graph for every block count
    with torch.no_grad():  # grad mode is part of the graph's guards: one mode, one compile
        parts, _ = _graph(name)(blocks, torch.tensor(divisor))
    if flags_ties:
        *parts, total = parts
    *header, body = parts
    out16 = out.view(torch.int16)
    for col, field in enumerate(header):  # fp16 scales as their bits; qh halves cast (wrapping) to 16 bits
        out16[:, col].copy_(field.view(torch.int16).view(-1) if field.dtype == torch.float16 else field.view(-1))
    out[:, 2 * len(header):].copy_(body.view(torch.uint8))
    if flags_ties and torch.count_nonzero(total) < n:
        tied = (total.view(-1) == 0).nonzero().view(-1)
        fixed = torch.empty(len(tied), out.shape[1], dtype=torch.uint8)
        legacy.quantize_blocks(name, blocks[tied], fixed)
        out[tied] = fixed
