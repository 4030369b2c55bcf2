"""Importance matrix: how much each input column of each Linear matters, from calibration text.

For a Linear y = W x, rounding W to W + E changes the output by E x, whose expected squared size
for row i is sum_j E_ij^2 E[x_j^2] when the activations are roughly uncorrelated. So the mean
squared activation E[x_j^2] of every input column, measured on calibration text, is the weight
each column's squared rounding error deserves (the idea behind llama.cpp's `imatrix` tool).
K-quant scale searches take it as `importance` (quant/kquants.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from athanor.errors import AthanorError
from athanor.io import atomic_write_bytes
from athanor.model.llama import LlamaModel
from athanor.tokenizer import Tokenizer


def calibration_tokens(run_dir: str | Path, n_tokens: int, split: str = "train",
                       text_file: str | Path | None = None) -> torch.Tensor:
    """Token ids to calibrate (or evaluate) on: from `text_file` if given, else the run's own
    token shards (`data/train.bin` or `data/val.bin`), first `n_tokens` of them."""
    run_dir = Path(run_dir)
    if text_file is not None:
        text_file = Path(text_file)
        if not text_file.is_file():
            raise AthanorError("calibration text not found", path=text_file)
        tok = Tokenizer.load(run_dir)
        ids = tok.encode_prompt(text_file.read_text(errors="replace"))
        return torch.tensor(ids[:n_tokens], dtype=torch.long)
    shard = run_dir / "data" / f"{split}.bin"
    if not shard.is_file():
        raise AthanorError(f"no token shard {shard.name} in the run directory; pass a text file instead", path=shard)
    from athanor.data.shards import open_tokens

    return torch.from_numpy(np.asarray(open_tokens(run_dir / "data", split)[:n_tokens]).astype(np.int64))


@torch.no_grad()
def collect_imatrix(model: LlamaModel, tokens: torch.Tensor, seq_len: int = 256) -> dict[str, torch.Tensor]:
    """Mean squared input activation per column, for every Linear of the model (by module name)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        model.eval()
        seq_len = min(seq_len, model.config.max_position_embeddings)
        for start in range(0, max(1, len(tokens) - 1), seq_len):
            chunk = tokens[start:start + seq_len]
            if len(chunk):
                model(chunk.view(1, -1))
    finally:
        for h in hooks:
            h.remove()
    return {k: v / counts[k] for k, v in sums.items()}


def save_imatrix(imatrix: dict[str, torch.Tensor], path: str | Path) -> None:
    data = save({k: v.contiguous() for k, v in imatrix.items()}, metadata={"format": "athanor-imatrix"})
    atomic_write_bytes(path, data)


def load_imatrix(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise AthanorError("importance matrix file not found", path=path) from None
    except Exception as e:  # safetensors' own error types
        raise AthanorError(f"cannot read importance matrix: {e}", path=path) from None
