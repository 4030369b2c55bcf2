"""Reward modelling on the one trainer loop (`athanor rm`): a score head learns which answer of a pair
is preferred (train/reward_model.py has the model and the loss).

- Data: the preference pairs of `athanor dpo`, read, held out and tokenized by the same code
  (train/dpo.py's `load_encoded`): each row is the prompt then one answer, as the chat format
  renders them, with the pair's margin from the data.
- Model: the base (usually the SFT model) with its LM head replaced by a new score head. With LoRA
  the adapters train and so does the whole score head, which starts untrained (PEFT's
  `modules_to_save`); the saved directory holds the merged model and `adapter/` with the head.
- A batch of B pairs is 2B rows, chosen answers then rejected, right-padded with the pad id (the
  score is read at each row's last non-pad token). The stage returns the mean loss times B and
  counts B, so a step's loss is the mean over its pairs however the loop splits them.
- Held out: the loss and TRL's metrics over all held-out pairs at once (min/max over every held-out
  reward, not TRL's mean of per-batch values), and the pair accuracy with its 95% Wilson interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from athanor.config import save_yaml
from athanor.data.preferences import EncodedPair
from athanor.data.sampler import EpochSampler
from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained
from athanor.model.llama import LlamaModel
from athanor.stats import wilson_interval
from athanor.tokenizer import Tokenizer
from athanor.train import dist
from athanor.train.dpo import PreferenceDataConfig, load_encoded, preference_train_config
from athanor.train.finetune import LoraSettings, maybe_apply_lora, save_run
from athanor.train.loop import TrainConfig, Trainer
from athanor.train.reward_model import RewardLossConfig, RewardModel, reward_loss


@dataclass
class RMRecipe:
    out_dir: str = "runs/rm"
    base: str = "runs/speedrun/sft"  # run dir (or HF checkpoint) of the model to start from, usually an SFT model
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=preference_train_config)


def collate(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids (2B, T), rows 0..B-1 prompt + chosen answer and B..2B-1 prompt + rejected, right-padded
    (TRL's DataCollatorForPreference order); margin (B,), 0 where the data gives none."""
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    margin = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    return {"input_ids": ids, "margin": margin}


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores of the chosen and of the rejected answers of a collated batch."""
    device = next(model.parameters()).device
    return model(batch["input_ids"].to(device)).chunk(2)


class RewardStage:
    """Shuffled pairs, sharded over ranks; loss = the Bradley-Terry loss summed over the batch's pairs."""

    def __init__(self, pairs: list[EncodedPair], heldout: list[EncodedPair], loss: RewardLossConfig, pad_id: int,
                 batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.pairs, self.heldout, self.loss = pairs, heldout, loss
        self.pad_id, self.batch_size = pad_id, batch_size
        self.sampler = EpochSampler(len(pairs), batch_size, seed, rank, world, what="preference pairs",
                                    fit_batch=True)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate([self.pairs[i] for i in self.sampler.next_indices().tolist()], self.pad_id)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["margin"])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_rewards(model, batch)
        loss, metrics = reward_loss(chosen, rejected, batch["margin"].to(chosen.device), self.loss)
        return loss * len(batch["margin"]), {k: float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The loss and TRL's metrics over every held-out pair, and the accuracy's 95% Wilson interval."""
        if not self.heldout:
            return {}
        chosen, rejected = [], []
        for i in range(0, len(self.heldout), self.batch_size):
            c, r = pair_rewards(model, collate(self.heldout[i:i + self.batch_size], self.pad_id))
            chosen.append(c)
            rejected.append(r)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        margin = torch.tensor([p.margin or 0.0 for p in self.heldout], device=chosen.device)
        loss, metrics = reward_loss(chosen, rejected, margin, self.loss)
        low, high = wilson_interval(int((chosen > rejected).sum()), len(self.heldout))
        return {"val_loss": float(loss), **{f"val_{k}": float(v) for k, v in metrics.items()},
                "val_accuracy_ci95_low": low, "val_accuracy_ci95_high": high}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def rm(recipe: RMRecipe, show_progress: bool = True) -> dict[str, Any]:
    """Train a reward model from `recipe.base` on preference pairs into `recipe.out_dir`; returns (and
    writes to eval.json) the held-out loss, TRL's metrics and the pair accuracy's interval."""
    out_dir = Path(recipe.out_dir)
    info = dist.setup(recipe.train.device)
    try:
        tok = Tokenizer.load(recipe.base)
        lm = load_pretrained(recipe.base, device=info.device)
        cfg = recipe.train
        if cfg.seq_len > lm.config.max_position_embeddings:
            raise AthanorError(f"train.seq_len {cfg.seq_len} is longer than the model's "
                               f"{lm.config.max_position_embeddings} positions", field="train.seq_len")
        train_pairs, held_pairs = load_encoded(recipe.data, tok, cfg.seq_len)  # the model reads every token
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(recipe, out_dir / "athanor.yaml")

        def with_score_head(base: LlamaModel) -> RewardModel:
            return RewardModel.from_language_model(base, tok.pad_id, seed=cfg.seed)

        model = with_score_head(lm)
        lora_info = maybe_apply_lora(model, recipe.lora, cfg.seed, modules_to_save=("score",))
        stage = RewardStage(train_pairs, held_pairs, recipe.loss, tok.pad_id, cfg.batch_size, cfg.seed,
                            info.rank, info.world)
        trainer = Trainer(model, stage, cfg, out_dir, info, show_progress, name="rm")
        heldout = trainer.fit() or (trainer.evaluate() if held_pairs else {})
        result: dict[str, Any] = {"center_rewards_coefficient": recipe.loss.center_rewards_coefficient,
                                  "train_pairs": len(train_pairs), "heldout_pairs": len(held_pairs),
                                  "steps": cfg.max_steps, "resumed_from_step": trainer.resumed_from, **heldout}
        if heldout:
            result["val_accuracy_interval"] = "Wilson score interval, 95%"
        save_run(trainer, recipe.base, lora_info, out_dir, tok, info, result, with_score_head)
        return result
    finally:
        dist.teardown()
