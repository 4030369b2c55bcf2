"""Block formats against gguf-py (which matches ggml's C code bit for bit)."""

import gguf
import numpy as np
import pytest
import torch
from gguf import quants as gq

from athanor.errors import AthanorError
from athanor.quant.formats import TYPES, dequantize, quantize

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def adversarial_rows(cols: int, rows: int = 24, seed: int = 0) -> np.ndarray:
    """Random rows plus the blocks that break naive quantizers: zeros, constants, lone outliers,
    one-signed blocks, values already on a grid, ties for the largest magnitude, tiny values,
    denormals (whose reciprocal overflows to inf)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0] = 0
    x[1] = 3.0
    x[2] = -2.5
    x[3, 7] = 1000.0
    x[4] = np.abs(x[4])
    x[5] = -np.abs(x[5])
    x[6] = rng.integers(-8, 8, cols) * 0.125
    x[7, ::32] = 4.0
    x[7, 1::32] = -4.0
    x[8] = 1e-30
    x[9] = rng.standard_normal(cols) * 1e4
    x[10, : cols // 2] = 0
    x[11, ::32] = -4.0  # a tie for the largest magnitude, the negative one first
    x[11, 1::32] = 4.0
    x[12, ::2] = -0.0  # signed zeros around a tie (the block minimum is nonzero: numpy's and C's
    x[12, 1::2] = 0.0  # min of -0.0 and 0.0 differ in sign, so gguf-py is not the C reference there)
    x[12, 3::32] = 1.0
    x[12, 7::32] = -1.0
    x[17] = 1e-40                      # every value denormal
    x[18, 64:96] = 0                   # a group of 16 (and of 32) whose only nonzero value is denormal
    x[18, 70] = 1e-40
    x[19] = 0
    x[19, 5] = -1e-42                  # one negative denormal in zeros
    x[20, 3] = 6e4                     # one huge value (near fp16's largest) among N(0, 1)
    return x


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_types_bit_exact_with_gguf(name: str) -> None:
    x = adversarial_rows(512)
    ref = gq.quantize(x, gguf.GGMLQuantizationType[name])
    ours = quantize(torch.from_numpy(x), name).numpy()
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    back = dequantize(torch.from_numpy(ours), name, 512).numpy()
    assert np.array_equal(back, gq.dequantize(ref, gguf.GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_types_bit_exact_across_chunks(name: str) -> None:
    """A matrix larger than one work chunk (512K weights), ending in a partial chunk."""
    x = np.random.default_rng(3).standard_normal((600, 1024)).astype(np.float32)
    ref = gq.quantize(x, gguf.GGMLQuantizationType[name])
    assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), ref)


def test_ternary_tq2_0_bit_exact_with_gguf() -> None:
    x = adversarial_rows(1024)
    ref = gq.quantize(x, gguf.GGMLQuantizationType.TQ2_0)
    ours = quantize(torch.from_numpy(x), "TQ2_0").numpy()
    assert np.array_equal(ours, ref)
    back = dequantize(torch.from_numpy(ours), "TQ2_0", 1024).numpy()
    assert np.array_equal(back, gq.dequantize(ref, gguf.GGMLQuantizationType.TQ2_0))
    assert len(np.unique(back[13, :256])) == 3  # ternary: -d, 0, d


def test_q8_0_rounds_halves_away_from_zero_like_roundf() -> None:
    """Blocks whose maximum is 127 have d = 1, so x / d is x itself: put every half-integer and its
    float32 neighbours there (0.49999997 + 0.5 rounds up to 1.0 in float32, a classic misrounding)."""
    halves = np.arange(0, 127, dtype=np.float32) + np.float32(0.5)
    vals = np.concatenate([halves, np.nextafter(halves, 0), np.nextafter(halves, 200)])
    vals = np.concatenate([vals, -vals]).astype(np.float32)
    vals = np.resize(vals, (len(vals) + 30) // 31 * 31).reshape(-1, 31)
    x = np.concatenate([np.full((len(vals), 1), 127, np.float32), vals], axis=1).reshape(1, -1)
    ref = gq.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(quantize(torch.from_numpy(x), "Q8_0").numpy(), ref)


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_bytes_dequantize_identically_under_gguf(name: str) -> None:
    x = adversarial_rows(1024)
    ours = quantize(torch.from_numpy(x), name)
    assert ours.shape == (x.shape[0], 1024 // 256 * TYPES[name].type_size)
    back = dequantize(ours, name, 1024).numpy()
    assert np.array_equal(back, gq.dequantize(ours.numpy(), gguf.GGMLQuantizationType[name]))
    assert np.all(back[0] == 0)                               # zeros stay zeros
    assert np.allclose(back[1], 3.0, rtol=1e-2)               # a constant survives every type
    assert np.allclose(back[2], -2.5, rtol=1e-2)


@pytest.mark.parametrize("name", [t for t in TYPES if t not in ("F32", "F16")])
def test_every_type_dequantizes_adversarial_rows_to_finite_values(name: str) -> None:
    """Denormal-only groups once gave the K-quants a NaN scale, so the whole 256-weight block came back
    NaN; every type must give finite values and keep all-zero and denormal-only rows at zero."""
    x = adversarial_rows(1024)
    back = dequantize(quantize(torch.from_numpy(x), name), name, 1024)
    assert torch.isfinite(back).all()
    assert torch.all(back[[0, 17, 19]] == 0)
    assert torch.allclose(back[18, 64:96], torch.zeros(32), atol=0.2)  # the denormal group's block is used
    err = (back - torch.from_numpy(x)).abs().amax(1)
    assert err[18] <= 1.5 * err[21]  # the rest of that block is quantized as well as a plain random row


# Upper bounds on the RMSE of N(0, 1) weights: about what the bit budget allows (halving per bit).
RMSE_BOUND = {"Q8_0": 0.007, "Q6_K": 0.02, "Q5_1": 0.04, "Q5_0": 0.045, "Q5_K": 0.04, "Q4_1": 0.08,
              "Q4_0": 0.09, "Q4_K": 0.08, "Q3_K": 0.16, "Q2_K": 0.3}


@pytest.mark.parametrize("name", sorted(RMSE_BOUND))
def test_round_trip_error_shrinks_with_bits(name: str) -> None:
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    back = dequantize(quantize(x, name), name, 1024)
    rmse = (back - x).pow(2).mean().sqrt().item()
    assert rmse < RMSE_BOUND[name]


def test_importance_weights_steer_the_kquant_search() -> None:
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(2))
    imp = torch.ones(512)
    imp[::8] = 100.0  # a few input columns see much larger activations
    plain = dequantize(quantize(x, "Q3_K"), "Q3_K", 512)
    steered = dequantize(quantize(x, "Q3_K", importance=imp), "Q3_K", 512)

    def weighted(y: torch.Tensor) -> float:
        return ((y - x) ** 2 * imp).mean().item()

    assert weighted(steered) < 0.9 * weighted(plain)


def test_compile_without_a_cxx_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import config

    from athanor.quant import compiled

    monkeypatch.setattr(compiled, "_compiled", {})
    with config.patch({"cpp.cxx": ("/nonexistent/c++",)}), pytest.raises(AthanorError, match="C\\+\\+ compiler"):
        quantize(torch.randn(64, 1024), "Q4_0", compile=True)


def test_float_types_and_bad_shapes() -> None:
    x = torch.randn(3, 64)
    assert torch.equal(dequantize(quantize(x, "F32"), "F32", 64), x)
    assert torch.equal(dequantize(quantize(x, "F16"), "F16", 64), x.half().float())
    with pytest.raises(AthanorError, match="blocks of 256"):
        quantize(x, "Q4_K")
    with pytest.raises(AthanorError, match="unknown tensor type"):
        quantize(x, "Q7_0")


def rounding_edge_rows(name: str, blocks: int = 512, seed: int = 0) -> tuple[np.ndarray, int]:
    """Blocks whose products x * id (Q4_1/Q5_1: (x - min) * id) land, once rounded to float32, exactly
    on a rounding boundary of the next step (the half-integers where trunc(v + c) or roundf(v) changes)
    while the exact product does not: there a fused multiply-add (one rounding) and the reference's
    separate multiply then add (two roundings) can disagree. Returns the rows and how many codes a
    fused multiply-add would change (emulated in float64, where the product and the sum are exact)."""
    rng = np.random.default_rng(seed)
    f32, up, down = np.float32, np.float32(np.inf), np.float32(-np.inf)
    symmetric = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16}.get(name)
    rows = []
    flips = 0
    for _ in range(blocks):
        scale = f32(rng.uniform(0.01, 10.0))
        if symmetric:  # element 0 sets d = scale / (+-)symmetric; the others stay below it in magnitude
            lo, head = f32(0), [scale]
            d = scale / f32(symmetric if name == "Q8_0" else -symmetric)
            c = f32(0.49999997) if name == "Q8_0" else f32(symmetric + 0.5)
            targets = np.arange(-symmetric + 0.5, symmetric - 0.5, 1.0)
            bounds = (-scale * f32(0.999), scale * f32(0.999))
        else:  # elements 0 and 1 are the block's minimum and maximum
            lo = f32(-scale * f32(rng.uniform(0.1, 0.9)))
            head = [lo, f32(lo + scale)]
            d = (head[1] - lo) / f32(15 if name == "Q4_1" else 31)
            c, targets, bounds = f32(0.5), np.array([0.5, 1.5]), (lo, head[1])  # + 0.5 flips only when small
        inv = f32(1) / d
        cells = []
        for t in rng.choice(targets, 32 - len(head)):
            v = f32(lo + f32(t) / inv)
            for step in range(6):  # walk to a neighbour whose float32 product lands on the boundary
                p32 = (v - lo) * inv
                if p32 == f32(np.floor(p32) + 0.5):
                    break
                v = np.nextafter(v, up if step % 2 else down)
            cells.append(v)
        cells = np.clip(np.array(cells, f32), *bounds)
        rows.append(np.concatenate([np.array(head, f32), cells]))
        diff = cells - lo
        prod = diff * inv
        exact = diff.astype(np.float64) * np.float64(inv)
        if name == "Q8_0":
            two, one = prod + np.copysign(c, prod), exact + np.copysign(np.float64(c), exact)
        else:
            two, one = prod + c, exact + np.float64(c)
        flips += int(np.count_nonzero(np.trunc(two) != np.trunc(one.astype(f32))))
    return np.stack(rows).reshape(-1, 1024), flips


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_types_bit_exact_on_rounding_edges(name: str) -> None:
    x, flips = rounding_edge_rows(name, blocks=128)
    assert flips > 0
    assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), gq.quantize(x, gguf.GGMLQuantizationType[name]))


def _needs_cxx() -> None:
    from athanor.quant.compiled import cxx_available

    if not cxx_available():
        pytest.skip("no C++ compiler for torch.compile")


@pytest.mark.slow
@pytest.mark.parametrize("name", LEGACY)
def test_compiled_legacy_types_bit_exact_with_gguf(name: str) -> None:
    """`compile=True` (torch.compile'd graphs, quant/compiled.py) writes gguf-py's bytes: on the
    adversarial rows (ties of either sign first, zero and signed-zero blocks, grids), on products that
    round onto a boundary (where a fused multiply-add would change codes: at least one here), on many
    random rows, and on a tensor too small for the graph (eager route)."""
    from athanor.quant import compiled

    _needs_cxx()
    edges, flips = rounding_edge_rows(name)
    assert flips > 0  # the edge rows would catch a contracted multiply-add
    cases = [adversarial_rows(512), adversarial_rows(2048, rows=40, seed=5), edges,
             np.random.default_rng(3).standard_normal((600, 1024)).astype(np.float32),
             np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)]
    for x in cases:
        ref = gq.quantize(x, gguf.GGMLQuantizationType[name])
        assert np.array_equal(quantize(torch.from_numpy(x), name, compile=True).numpy(), ref)
    assert name in compiled._compiled  # the graph ran (not only the eager route)
