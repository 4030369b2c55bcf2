"""Preference optimization on the one trainer loop: DPO and its relatives (train/preference_loss.py).

- Data: preference pairs in TRL's formats (data/preferences.py), each tokenized once with the
  model's chat format: the prompt with the generation prompt, then each answer with its assistant
  mask, exactly the tokens SFT would learn from. Pairs are held out by a stable hash of their place
  (file:line), so the held-out set does not move when the file grows.
- Reference: the log-probs of every pair under the starting model, computed once before training
  (TRL's `precompute_ref_log_probs`). That is the frozen SFT model, and with LoRA the base with the
  adapter off, without a second copy of the model in memory or a second forward per step. SimPO
  needs none.
- A batch of B pairs is 2B rows, chosen answers then rejected, each row the prompt and the answer,
  right-padded (a padded tail is never attended to by the real tokens before it), targets -100
  outside the answer. The stage returns the mean loss times B and counts B, so a step's loss is the
  mean over its pairs however the loop splits them into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from athanor.config import save_yaml
from athanor.data.corpus import is_held_out
from athanor.data.preferences import EncodedPair, encode_pair, load_pairs
from athanor.data.sampler import EpochSampler
from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained
from athanor.model.linear_ce import IGNORE_INDEX
from athanor.tokenizer import Tokenizer
from athanor.train import dist
from athanor.train.finetune import LoraSettings, maybe_apply_lora, save_run
from athanor.train.loop import TrainConfig, Trainer
from athanor.train.preference_loss import Logps, PreferenceLossConfig, preference_loss, sequence_logps


@dataclass
class PreferenceDataConfig:
    paths: list[str] = field(default_factory=list)  # preference files (JSONL, JSON, parquet)
    heldout: str | None = None  # a held-out preference file; None: `heldout_fraction` of `paths`
    heldout_fraction: float = 0.05
    truncate: bool = False  # cut pairs longer than train.seq_len + 1 instead of refusing them


def preference_train_config() -> TrainConfig:
    """The training defaults of the stages that learn from pairs (DPO here, the reward model in rm.py)."""
    return TrainConfig(max_steps=100, batch_size=8, seq_len=256, lr=1e-4, warmup_steps=10, eval_every=0,
                       eval_tokens=0, ckpt_every=50, log_every=10, weight_decay=0.0)


@dataclass
class DPORecipe:
    out_dir: str = "runs/dpo"
    base: str = "runs/speedrun/sft"  # run dir (or HF checkpoint) of the model to tune, usually an SFT model
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=preference_train_config)


def load_encoded(d: PreferenceDataConfig, tok: Tokenizer, max_length: int
                 ) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(training pairs, held-out pairs), tokenized, each prompt + answer at most `max_length` tokens; a bad
    record or an overlong pair raises with its place. The reward model's stage (train/rm.py) shares it."""
    if not d.paths:
        raise AthanorError("no preference data: give one or more files (--data FILE, or --data.paths=...)",
                           field="data.paths")

    def encode(pairs: list) -> list[EncodedPair]:
        return [encode_pair(tok, p, max_length, d.truncate) for p in pairs]

    pairs = [p for path in d.paths for p in load_pairs(path)]
    if d.heldout is not None:
        return encode(pairs), encode(load_pairs(d.heldout))
    held = [is_held_out(f"{Path(p.path).name}:{p.line}", d.heldout_fraction) for p in pairs]
    return encode([p for p, h in zip(pairs, held, strict=True) if not h]), \
        encode([p for p, h in zip(pairs, held, strict=True) if h])


def collate(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs x and targets y (2B, T): rows 0..B-1 the chosen answers, B..2B-1 the rejected."""
    rows = [(p.prompt_ids + p.chosen_ids, [0] * len(p.prompt_ids) + p.chosen_mask) for p in pairs] + \
           [(p.prompt_ids + p.rejected_ids, [0] * len(p.prompt_ids) + p.rejected_mask) for p in pairs]
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[r, :n] = torch.tensor(ids[:-1])
        y[r, :n] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)])
    return {"x": x, "y": y}


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Logps, Logps]:
    """The model's log-probs of the chosen and of the rejected answers of a collated batch."""
    device = next(model.parameters()).device
    lp = sequence_logps(model, batch["x"].to(device), batch["y"].to(device))
    B = lp.sum.shape[0] // 2
    return Logps(lp.sum[:B], lp.count[:B]), Logps(lp.sum[B:], lp.count[B:])


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list[EncodedPair], pad_id: int, batch_size: int,
                    show_progress: bool = False) -> torch.Tensor:
    """(n, 2): each pair's summed log-probs of its chosen and rejected answer under `model`."""
    was_training = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", disable=not show_progress):
        chosen, rejected = pair_logps(model, collate(pairs[i:i + batch_size], pad_id))
        out.append(torch.stack([chosen.sum, rejected.sum], 1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


class PreferenceStage:
    """Shuffled pairs, sharded over ranks; loss = the preference loss summed over the batch's pairs."""

    def __init__(self, pairs: list[EncodedPair], ref: torch.Tensor, heldout: list[EncodedPair],
                 heldout_ref: torch.Tensor, loss: PreferenceLossConfig, pad_id: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.pairs, self.ref, self.heldout, self.heldout_ref = pairs, ref, heldout, heldout_ref
        self.loss, self.pad_id, self.batch_size = loss, pad_id, batch_size
        self.sampler = EpochSampler(len(pairs), batch_size, seed, rank, world, what="preference pairs",
                                    fit_batch=True)

    def next_batch(self) -> dict[str, Any]:
        idx = self.sampler.next_indices().tolist()
        return {**collate([self.pairs[i] for i in idx], self.pad_id), "ref": self.ref[idx]}

    def loss_tokens(self, batch: dict[str, Any]) -> int:
        return len(batch["ref"])

    def _loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_logps(model, batch)
        ref = batch["ref"].to(chosen.sum.device)
        return preference_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.loss)

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self._loss(model, batch)
        return loss * len(batch["ref"]), {k: float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The loss and TRL's metrics over the held-out pairs (means weighted by pairs)."""
        if not self.heldout:
            return {}
        totals: dict[str, float] = {}
        for i in range(0, len(self.heldout), self.batch_size):
            part = self.heldout[i:i + self.batch_size]
            loss, metrics = self._loss(model, {**collate(part, self.pad_id),
                                               "ref": self.heldout_ref[i:i + self.batch_size]})
            for k, v in {"loss": loss, **metrics}.items():
                totals[f"val_{k}"] = totals.get(f"val_{k}", 0.0) + float(v) * len(part)
        return {k: v / len(self.heldout) for k, v in totals.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def dpo(recipe: DPORecipe, show_progress: bool = True) -> dict[str, Any]:
    """Tune `recipe.base` on preference pairs into `recipe.out_dir`; returns (and writes to eval.json)
    the held-out loss and TRL's metrics after training (before it, the policy is the reference: every
    reward is 0)."""
    out_dir = Path(recipe.out_dir)
    info = dist.setup(recipe.train.device)
    try:
        tok = Tokenizer.load(recipe.base)
        model = load_pretrained(recipe.base, device=info.device)
        cfg = recipe.train
        if cfg.seq_len + 1 > model.config.max_position_embeddings:
            raise AthanorError(f"train.seq_len {cfg.seq_len} leaves no room in the model's "
                               f"{model.config.max_position_embeddings} positions", field="train.seq_len")
        train_pairs, held_pairs = load_encoded(recipe.data, tok, cfg.seq_len + 1)  # the model reads ids[:-1]
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(recipe, out_dir / "athanor.yaml")
        # The reference is the starting model: computed before any adapter or step changes it.
        needs_ref = recipe.loss.loss_type != "simpo"
        ref, held_ref = ((reference_logps(model, p, tok.pad_id, cfg.batch_size, show_progress and info.is_main)
                          if needs_ref else torch.zeros(len(p), 2)) for p in (train_pairs, held_pairs))
        lora_info = maybe_apply_lora(model, recipe.lora, cfg.seed)
        stage = PreferenceStage(train_pairs, ref, held_pairs, held_ref, recipe.loss, tok.pad_id, cfg.batch_size,
                                cfg.seed, info.rank, info.world)
        trainer = Trainer(model, stage, cfg, out_dir, info, show_progress, name=recipe.loss.loss_type)
        heldout = trainer.fit() or (trainer.evaluate() if held_pairs else {})
        result: dict[str, Any] = {"loss_type": recipe.loss.loss_type, "beta": recipe.loss.beta,
                                  "train_pairs": len(train_pairs), "heldout_pairs": len(held_pairs),
                                  "steps": cfg.max_steps, "resumed_from_step": trainer.resumed_from,
                                  **heldout}
        save_run(trainer, recipe.base, lora_info, out_dir, tok, info, result)
        return result
    finally:
        dist.teardown()
