"""What the side-by-side benchmarks share: the speedrun-shaped model both sides load, and the
process's resident-memory readings (Linux /proc) that give "peak" and "step peak"."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model's size arguments, the speedrun's shape by default."""
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)


def save_speedrun_model(args: argparse.Namespace, out: Path, positions: int) -> None:
    """The speedrun-shaped model (`args`' sizes) with seed-0 weights, in the transformers layout."""
    import torch

    from athanor.model.hf import save_pretrained
    from athanor.model.llama import LlamaModel, ModelConfig

    torch.manual_seed(0)
    save_pretrained(LlamaModel(ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(512, positions))), out)


def reset_peak() -> float:
    """Reset the resident high-water mark to the current resident set (Linux); returns that, in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)
