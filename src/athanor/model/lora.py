"""LoRA: train a low-rank update beside frozen weights (Hu et al., 2021), in PEFT's file layout.

A targeted `nn.Linear` W becomes W x + s * B A dropout(x), with A (r x in) Kaiming-uniform, B
(out x r) zero (so training starts from the base model exactly) and s = alpha / r, or alpha / sqrt(r)
with rsLoRA (Kalajdzievski, 2023: keeps the update's scale stable as r grows). Only A and B train.

Files follow PEFT, so `PeftModel.from_pretrained(hf_model, adapter_dir)` loads them:
`adapter_config.json` (peft_type LORA, r, lora_alpha, lora_dropout, use_rslora, target_modules as
module-name suffixes) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`.

A model's heads never get adapters. A head that starts untrained (a reward model's `score`) is
instead trained whole beside them and saved with the adapter, as PEFT's `modules_to_save` does
(key `base_model.model.score.weight`, the config's task_type SEQ_CLS).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from athanor.errors import AthanorError
from athanor.io import atomic_write, atomic_write_text

PEFT_PREFIX = "base_model.model."
# Output heads: never adapted (a score head, or PPO's value head, is trained whole, see above).
HEADS = ("lm_head", "score", "v_head")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    target_modules: list[str] | None = None  # module-name suffixes (q_proj, ...); None: every linear but the head

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass
class LoraInfo:
    config: LoraConfig
    targets: list[str] = field(default_factory=list)  # full module paths that carry adapters
    trainable: int = 0
    modules_to_save: list[str] = field(default_factory=list)  # modules trained whole beside the adapters


class LoraLinear(nn.Module):
    """A frozen linear layer plus its low-rank update; PEFT's attribute names."""

    def __init__(self, base: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own default, as PEFT
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def _targets(model: nn.Module, config: LoraConfig) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in HEADS:
            continue
        if config.target_modules is None or name.split(".")[-1] in config.target_modules:
            names.append(name)
    if not names:
        raise AthanorError(f"no linear layer matches target_modules {config.target_modules}",
                           field="lora.target_modules")
    return names


def apply_lora(model: nn.Module, config: LoraConfig, seed: int | None = None,
               modules_to_save: tuple[str, ...] = ()) -> LoraInfo:
    """Freeze `model` but `modules_to_save` and put adapters on the targeted linear layers (in place)."""
    if config.r < 1:
        raise AthanorError("r must be at least 1", field="lora.r")
    for p in model.parameters():
        p.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)
    targets = _targets(model, config)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(getattr(parent, child), config))
    for name in modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoraInfo(config, targets, trainable, list(modules_to_save))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base: every adapter's update scaled to 0 inside the block (PEFT's
    `disable_adapter`), so a frozen reference needs no second copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    scales = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, scales, strict=True):
            m.scaling = s


def adapter_state(model: nn.Module, modules_to_save: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapter weights (and those of `modules_to_save`) under PEFT's saved key names."""
    state = {f"{PEFT_PREFIX}{name}.{key}": w.detach().to("cpu", torch.float32).contiguous()
             for name in modules_to_save for key, w in model.get_submodule(name).state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            for part in ("lora_A", "lora_B"):
                w = getattr(module, part).weight
                state[f"{PEFT_PREFIX}{name}.{part}.weight"] = w.detach().to("cpu", torch.float32).contiguous()
    return state


def save_adapter(model: nn.Module, info: LoraInfo, out_dir: str | Path, base: str = "") -> None:
    out_dir = Path(out_dir)
    cfg = info.config
    suffixes = sorted({t.split(".")[-1] for t in info.targets})
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if "score" in info.modules_to_save else "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": suffixes, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": info.modules_to_save or None, "layers_to_transform": None,
        "use_dora": False,
    }
    data = save(adapter_state(model, info.modules_to_save), metadata={"format": "pt"})
    atomic_write(out_dir / "adapter_model.safetensors", lambda f: f.write(data))
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraInfo:
    """Put the adapter saved in `adapter_dir` (by athanor or PEFT) onto `model`."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise AthanorError("not an adapter directory: adapter_config.json is missing", path=adapter_dir)
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AthanorError(f"not valid JSON: {e.msg}", path=cfg_path, line=e.lineno) from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
        raise AthanorError(f"peft_type {peft_type!r} is not supported (only LORA)", path=cfg_path, field="peft_type")
    for key in ("r", "lora_alpha"):
        if not isinstance(raw.get(key), int | float):
            raise AthanorError("missing or not a number", path=cfg_path, field=key)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise AthanorError("the adapter's weights are missing", path=weights)
    targets = raw.get("target_modules")
    config = LoraConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0)),
                        rslora=bool(raw.get("use_rslora", False)),
                        target_modules=[targets] if isinstance(targets, str) else targets)
    info = apply_lora(model, config)
    state = load_file(weights)
    ours = adapter_state(model)
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise AthanorError(f"adapter does not fit the model: {detail}", path=adapter_dir)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                for part in ("lora_A", "lora_B"):
                    getattr(module, part).weight.copy_(state[f"{PEFT_PREFIX}{name}.{part}.weight"])
    return info


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += s B A) and drop the adapters, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            base = module.base_layer
            base.weight += module.delta_weight().to(base.weight.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
