"""Quantized inference by module swap: weights stay in their GGML blocks and are dequantized on use.

`quantize_weights` turns a model's state dict into blocks under a scheme (the same bytes the
GGUF export writes); `quantize_model` swaps every `nn.Linear` (and the embedding) of a
`LlamaModel` for a module that holds only those bits, so a 4-bit model holds ~4.5 bits per
weight in memory instead of 32. Each forward dequantizes the weight into a transient float
matrix and multiplies (dequantize on the fly; no fused low-bit kernels);
the embedding dequantizes only the rows it looks up. model/llama.py is untouched: the swapped
modules keep `nn.Linear`'s call signature and expose `.weight` for the fused loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from athanor.model.llama import LlamaModel
from athanor.quant.formats import QuantType, dequantize, quantize
from athanor.quant.schemes import Scheme, get_scheme, weight_type


@dataclass
class QTensor:
    """A 2-D weight in GGML blocks: (rows, bytes per row) uint8 and the float shape it stands for."""

    qtype: QuantType
    data: torch.Tensor
    rows: int
    cols: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.cols).view(self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def quantize_weights(model: LlamaModel, scheme: str | Scheme,
                     imatrix: dict[str, torch.Tensor] | None = None, compile: bool = False) -> dict[str, QTensor]:
    """The state dict (HF names; the tied head left out) in the scheme's types.

    `imatrix` maps a Linear's name (e.g. `model.layers.0.mlp.down_proj`) to the mean squared
    activation of each of its input columns; it weights the K-quant scale search. `compile`:
    the legacy types through `torch.compile`d graphs (same bytes; see `formats.quantize`).
    """
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    out = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        w = p.detach().float().cpu()
        w2 = w.view(1, -1) if w.dim() == 1 else w
        t = weight_type(scheme, name, w2.shape[1], model.config)
        # A tied embedding is quantized once and doubles as the output head: its columns are
        # then weighted by the activations entering the head.
        module = "lm_head" if name == "model.embed_tokens.weight" else name.removesuffix(".weight")
        imp = None if imatrix is None else imatrix.get(module)
        out[name] = QTensor(t, quantize(w2, t, imp, compile), w2.shape[0], w2.shape[1])
    return out


class QWeight(nn.Module):
    """A 2-D weight held quantized, dequantized (all rows, or some) on demand.

    Q8_0 and Q4_0 are held split into codes and fp16 scales (the same bits as their blocks,
    rearranged): their dequantization is then one integer-to-float conversion and one multiply,
    about 8x faster than unpacking interleaved blocks. Other types keep the GGML blocks.
    """

    def __init__(self, q: QTensor) -> None:
        super().__init__()
        self.qtype, self.rows, self.cols = q.qtype, q.rows, q.cols
        self.split = q.qtype.name in ("Q8_0", "Q4_0")
        if self.split:
            blocks = q.data.view(q.rows, -1, q.qtype.type_size)
            self.register_buffer("scales", blocks[..., :2].contiguous().view(torch.float16).view(q.rows, -1))
            self.register_buffer("codes", blocks[..., 2:].contiguous().view(q.rows, -1))
        else:
            self.register_buffer("blocks", q.data)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        if not self.split:
            data = self.blocks if rows is None else self.blocks[rows]
            return dequantize(data, self.qtype, self.cols)
        codes = self.codes if rows is None else self.codes[rows]
        scales = (self.scales if rows is None else self.scales[rows]).float().unsqueeze(-1)
        n = codes.shape[0]
        if self.qtype.name == "Q8_0":
            q = codes.view(torch.int8).float().view(n, -1, 32)
        else:  # Q4_0: per block, 16 low nibbles then 16 high nibbles, offset by 8
            packed = codes.view(n, -1, 16)
            q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float() - 8
        return (q * scales).view(n, self.cols)


def _int4_kernel_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


class Int4Kernel(nn.Module):
    """Q4_0 or Q8_0 weights as torch's packed int4 CPU matmul (`_weight_int4pack_mm_for_cpu`).

    That kernel computes x W^T with W = (q - 8) * scale + zero per group of 32 inputs, q in
    0..15: Q4_0's blocks are that with scale d, zero 0. Q8_0's codes split into two such
    matrices, q = 16 h + l (h the signed high nibble, l the low): W = 16d (h + 8 - 8) and
    d (l - 8) + 8d, summed. The kernel is fast only with bfloat16 activations, scales and
    outputs (measured 4x an fp32 `F.linear` at batch 1; its fp32 path is 7x slower than
    `F.linear`), so this trades exactness for speed: the scales are rounded from fp16 to bf16
    (relative error <= 2^-9) and so are the activations and each output, like llama.cpp, which
    rounds activations to 8 bits for its quantized dot products. Holds its own packed copy of
    the weight (4 or 8 bits, +1 bit of scales per weight) next to the exact blocks.
    """

    def __init__(self, qweight: QWeight) -> None:
        super().__init__()
        n, k = qweight.rows, qweight.cols
        d = qweight.scales.float().view(n, -1)  # (rows, blocks)
        if qweight.qtype.name == "Q4_0":
            packed = qweight.codes.view(n, -1, 16)
            parts = [(torch.cat([packed & 0x0F, packed >> 4], dim=-1), d, torch.zeros_like(d))]
        else:  # Q8_0
            q = qweight.codes.view(torch.int8).view(n, -1, 32)
            parts = [((q >> 4) + 8, 16 * d, torch.zeros_like(d)), (q & 0x0F, d, 8 * d)]
        for i, (codes, scale, zero) in enumerate(parts):
            codes = codes.reshape(n, k).to(torch.int32)
            self.register_buffer(f"packed{i}", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
            sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            self.register_buffer(f"scales_zeros{i}", sz)  # (blocks, rows, 2)
        self.parts = len(parts)
        self.out_features = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(xb, self.packed0, 32, self.scales_zeros0).float()
        if self.parts == 2:
            y += torch._weight_int4pack_mm_for_cpu(xb, self.packed1, 32, self.scales_zeros1).float()
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class QuantLinear(nn.Module):
    """`y = x W^T (+ b)` with W held quantized (`QWeight`), dequantized for each call, or with
    `kernel=True` (Q4_0/Q8_0 on CPU) multiplied by torch's int4 kernel in bf16 (`Int4Kernel`)."""

    def __init__(self, qweight: QWeight, bias: torch.Tensor | None = None, kernel: bool = False) -> None:
        super().__init__()
        self.qweight = qweight
        self.in_features, self.out_features = qweight.cols, qweight.rows
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = Int4Kernel(qweight) if kernel and qweight.split and _int4_kernel_available() else None

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.device.type == "cpu":
            y = self.kernel(x)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.qweight.qtype.name}"


class QuantEmbedding(nn.Module):
    """Token embedding held quantized: a lookup dequantizes just the rows it needs."""

    def __init__(self, qweight: QWeight) -> None:
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.rows, qweight.cols

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.dequantize(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)


def quantize_model(model: LlamaModel, scheme: str | Scheme, imatrix: dict[str, torch.Tensor] | None = None,
                   weights: dict[str, QTensor] | None = None, kernel: bool = False) -> LlamaModel:
    """Swap the model's Linear and Embedding modules for quantized ones, in place; returns it.

    Pass `weights` (from `quantize_weights` or a GGUF file) to reuse blocks already made.
    A tied output head shares the embedding's blocks, as in a GGUF file without `output.weight`.
    `kernel=True` multiplies Q4_0/Q8_0 weights with torch's int4 CPU kernel in bf16 (faster
    decode on models whose weights outgrow the cache, approximate: see `Int4Kernel`); by default
    every product uses the exact dequantized weights.
    """
    weights = weights if weights is not None else quantize_weights(model, scheme, imatrix)
    embedding = QWeight(weights["model.embed_tokens.weight"])
    model.model.embed_tokens = QuantEmbedding(embedding)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                q = weights.get(f"{full}.weight")
                qweight = embedding if q is None else QWeight(q)  # None: the tied head
                setattr(module, child_name, QuantLinear(qweight, child.bias, kernel))
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes of weights a model holds: parameters, quantized blocks and int4-kernel copies
    (shared tensors once; the rotary tables, which are not weights, left out)."""
    tensors = [p for _, p in model.named_parameters()]
    weight_buffers = ("blocks", "codes", "scales", "packed0", "packed1", "scales_zeros0", "scales_zeros1")
    tensors += [b for n, b in model.named_buffers() if n.endswith(weight_buffers)]
    unique = {t.data_ptr(): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())
