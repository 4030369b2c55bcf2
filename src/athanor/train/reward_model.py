"""A reward model: the language model's backbone with a scalar score head, and its Bradley-Terry loss.

The model is transformers' `LlamaForSequenceClassification` (`Qwen2...`, `Mistral...`, `Qwen3...`)
with `num_labels=1`: the backbone `model` (final norm included), then `score`, a bias-free (1, hidden)
linear map, read at each row's last non-pad token: the rightmost position whose id is not the
config's `pad_token_id`, whatever the padding side (so a pad id that also ends the text, as when
pad is eos, is skipped there too, as transformers does). Saved by model/hf.py's `save_pretrained`
with that architecture, `num_labels=1` and the pad id, without `lm_head`, so transformers loads it
and scores alike; `load_pretrained(dir, model_class=RewardModel)` loads it back.

The loss, as TRL 1.16's RewardTrainer.compute_loss computes it over a batch of pairs with rewards
r_c (chosen) and r_r (rejected) and the data's per-pair margin m (0 where a pair has none):

    L = -mean(log sigma(r_c - r_r - m))                       Bradley-Terry (Bradley & Terry 1952;
                                                               the margin as in Llama 2, Touvron 2023)
        + c * mean((r_c + r_r)^2)                             reward centering (Eisenstein et al. 2023),
                                                               c = center_rewards_coefficient, off by default

and TRL's metrics: accuracy (share of pairs with r_c > r_r strictly), margin (mean r_c - r_r, without
the data's margin), min_reward, mean_reward and max_reward over the chosen and rejected rewards.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from athanor.errors import AthanorError
from athanor.model.llama import LlamaModel, ModelConfig


class RewardModel(LlamaModel):
    """`forward(input_ids) -> (batch,)` fp32 scores. It shares the language model's backbone, rotary tables
    and initialization; its head is `score` instead of `lm_head`."""

    hf_head = "ForSequenceClassification"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        del self.lm_head  # with tied embeddings only the module goes: the weight stays the embeddings'
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, 0.0, config.initializer_range)  # as transformers inits a new head

    @classmethod
    def from_language_model(cls, lm: LlamaModel, pad_token_id: int, seed: int = 0) -> RewardModel:
        """A reward model on `lm`'s backbone (taken over, not copied; `lm_head` dropped) with a new score
        head drawn from `seed`, reading the last token that is not `pad_token_id`."""
        config = dataclasses.replace(lm.config, pad_token_id=pad_token_id)
        with torch.device("meta"):
            rm = cls(config)
        rm.model = lm.model
        rm.rope_cos, rm.rope_sin = lm.rope_cos, lm.rope_sin
        embed = lm.model.embed_tokens.weight
        weight = torch.empty(1, config.hidden_size)
        nn.init.normal_(weight, 0.0, config.initializer_range, generator=torch.Generator().manual_seed(seed))
        rm.score = nn.Linear(config.hidden_size, 1, bias=False, device=embed.device, dtype=embed.dtype)
        with torch.no_grad():
            rm.score.weight.copy_(weight)
        return rm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The score of each row of `input_ids` (B, T), padded on either side with the pad id. The
        attention is causal over the whole row, as transformers' without an attention mask: with
        right padding (what athanor collates) no real token sees a pad."""
        hidden = self.hidden_states(input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(hidden[rows, self.last_token(input_ids)]).squeeze(-1).float()

    def last_token(self, input_ids: torch.Tensor) -> torch.Tensor | int:
        """Each row's last non-pad position, by transformers' rule (`GenericForSequenceClassification`)."""
        pad = self.config.pad_token_id
        if pad is None:
            if input_ids.shape[0] != 1:
                raise ValueError("a batch of more than one row needs the config's pad_token_id to find its ends")
            return -1
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (positions * (input_ids != pad)).argmax(-1)


@dataclass
class RewardLossConfig:
    """TRL's RewardConfig name; None (TRL's default) leaves the rewards uncentered. Eisenstein et al.
    recommend 0.01."""

    center_rewards_coefficient: float | None = None

    def __post_init__(self) -> None:
        c = self.center_rewards_coefficient
        if c is not None and not (math.isfinite(c) and c >= 0):
            raise AthanorError(f"must be a number >= 0, got {c}", field="center_rewards_coefficient")


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None,
                config: RewardLossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over the pairs (rewards (B,) each, margin (B,) or None) and TRL's metrics (detached)."""
    delta = chosen - rejected
    loss = -F.logsigmoid(delta if margin is None else delta - margin).mean()
    if config.center_rewards_coefficient is not None:
        loss = loss + config.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    rewards = torch.cat([chosen, rejected]).detach()
    metrics = {
        "accuracy": (chosen > rejected).float().mean().detach(),
        "margin": delta.mean().detach(),
        "min_reward": rewards.min(),
        "mean_reward": rewards.mean(),
        "max_reward": rewards.max(),
    }
    return loss, metrics
