"""What the side-by-side benchmarks share: the speedrun-shaped model both sides load, and the
process's resident-memory readings (Linux /proc) that give "peak" and "step peak"."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def trl_step_clock(ends: list[float], base: list[float], on_step_end: Callable[[], None] | None = None) -> Any:
    """A transformers TrainerCallback timing TRL's steps the way athanor's side is timed: `base` gets the
    resident set when training begins (the peak reset there), `ends` the first step's start and every
    step's end (a step runs from the previous one's end); `on_step_end` runs after each step's stamp."""
    import transformers

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            base.append(reset_peak())

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())
            if on_step_end is not None:
                on_step_end()

    return Clock()
