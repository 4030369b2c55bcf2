"""What every fine-tuning stage (SFT, DPO and its relatives) does around the trainer loop the same way:
LoRA settings and their application, and saving the trained model as a run directory (the model in
the transformers layout, merged when LoRA trained it, with the adapter beside it in PEFT's layout)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from athanor.io import atomic_write_text
from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel
from athanor.model.lora import LoraConfig, LoraInfo, apply_lora, merge_lora, save_adapter
from athanor.tokenizer import Tokenizer
from athanor.train.dist import DistInfo
from athanor.train.loop import Trainer


@dataclass
class LoraSettings:
    """`--lora.enabled=true` trains low-rank adapters instead of every weight (see model/lora.py)."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale by alpha / sqrt(r) (Kalajdzievski, 2023) instead of alpha / r
    target_modules: list[str] = field(default_factory=list)  # empty: every linear layer but the output head


def maybe_apply_lora(model: nn.Module, settings: LoraSettings, seed: int,
                     modules_to_save: tuple[str, ...] = ()) -> LoraInfo | None:
    """Adapters on `model` when `settings.enabled` (the base weights frozen but `modules_to_save`), else None."""
    if not settings.enabled:
        return None
    config = LoraConfig(r=settings.r, alpha=settings.alpha, dropout=settings.dropout, rslora=settings.rslora,
                        target_modules=settings.target_modules or None)
    return apply_lora(model, config, seed=seed, modules_to_save=modules_to_save)


def save_trained(trainer: Trainer, base: str, lora: LoraInfo | None, out_dir: Path, tok: Tokenizer,
                 info: DistInfo, skeleton: Callable[[LlamaModel], LlamaModel] | None = None,
                 unwrap: Callable[[LlamaModel], LlamaModel] | None = None) -> LlamaModel | None:
    """Write the trained weights into `out_dir` as a model directory with the tokenizer; with LoRA also
    `adapter/`, and the model merged. Every rank calls it (gathering an FSDP model's full weights is
    a collective); the main rank writes and gets the model back, the others None. `skeleton` turns
    the base as loaded into the trained model's shape (a reward model's head) before the weights go in;
    `unwrap` the trained model into what is saved (PPO's policy without its value head)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    export = load_pretrained(base, device=info.device)
    if skeleton is not None:
        export = skeleton(export)
    if lora is not None:
        apply_lora(export, lora.config, modules_to_save=tuple(lora.modules_to_save))
        export.load_state_dict(full)
        save_adapter(export, lora, out_dir / "adapter", base=base)
        export = merge_lora(export)
    else:
        export.load_state_dict(full)
    if unwrap is not None:
        export = unwrap(export)
    save_pretrained(export, out_dir)
    tok.save(out_dir, model_max_length=export.config.max_position_embeddings)
    return export


def save_run(trainer: Trainer, base: str, lora: LoraInfo | None, out_dir: Path, tok: Tokenizer, info: DistInfo,
             result: dict[str, Any], skeleton: Callable[[LlamaModel], LlamaModel] | None = None,
             unwrap: Callable[[LlamaModel], LlamaModel] | None = None) -> None:
    """`save_trained`, then the run's `result` into eval.json (main rank), with LoRA's trainable count."""
    if save_trained(trainer, base, lora, out_dir, tok, info, skeleton, unwrap) is not None:
        if lora is not None:
            result["trainable_parameters"] = lora.trainable
        atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
