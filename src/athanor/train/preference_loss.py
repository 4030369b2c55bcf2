"""Preference losses: DPO and its relatives, as pure functions of sequence log-probabilities.

Each pair is a prompt x with a chosen answer y_w and a rejected one y_l. With the log-ratio of an
answer under the policy and the frozen reference,

    r(y) = log pi(y | x) - log pi_ref(y | x)      (log-probs summed over the answer's tokens)
    h    = r(y_w) - r(y_l)

the losses, averaged over the pairs of a batch, are (sigma the logistic function):

- "sigmoid", DPO (Rafailov et al. 2023, "Direct Preference Optimization"):  -log sigma(beta h).
  With label_smoothing = eps > 0 it is conservative DPO (cDPO, Mitchell 2023), for labels flipped
  with probability eps ("A note on DPO with noisy preferences"):
  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). TRL 1.16's
  DPOTrainer ignores label_smoothing for "sigmoid" (its older versions, and its "aot" loss on a
  single pair, compute this cDPO form); athanor applies it rather than drop a setting silently.
- "robust", robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), an unbiased loss under
  labels flipped with probability eps:
  [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps).
- "ipo", IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
  Human Preferences", eq. 17, beta is their tau): (h' - 1 / (2 beta))^2, where, following TRL
  1.16 exactly, h' uses each answer's log-ratio divided by its number of tokens:
  h' = r(y_w) / |y_w| - r(y_l) / |y_l|. (The paper writes sequence log-probs; TRL normalizes by
  length, as the IPO authors confirmed their results did.) |y| is the number of answer tokens
  scored, TRL's completion-mask count whenever the prompt is not empty.
- "hinge", SLiC (Zhao et al. 2023, "SLiC-HF"): max(0, 1 - beta h).
- "simpo", SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free
  Reward"): no reference; the reward of an answer is its *average* token log-prob,
  m(y) = log pi(y | x) / |y|, and gamma a target margin:
  -log sigma(beta (m(y_w) - m(y_l)) - gamma), label-smoothed as cDPO when eps > 0. As in TRL
  1.16's CPOTrainer (trl.experimental.cpo, loss_type="simpo") with cpo_alpha=0: the paper has no
  NLL term, which CPOTrainer adds by default (cpo_alpha=1).

Metrics carry TRL's names and reductions (means over the pairs of the batch): rewards/chosen and
rewards/rejected (beta r(y), for SimPO beta m(y)), rewards/margins (their difference),
rewards/accuracies (fraction of pairs whose chosen reward is strictly higher), logps/chosen and
logps/rejected (the policy's summed log-probs, for SimPO the averages, as CPOTrainer logs them).

With rpo_alpha = a > 0 the loss adds a times the negative log-likelihood of the chosen answers, per
token over the batch (-sum log pi(y_w) / sum |y_w|): RPO (Pang et al. 2024, "Iterative Reasoning
Preference Optimization"), TRL 1.16's loss_type=["sigmoid", "sft"] with loss_weights=[1, a], and for
SimPO CPOTrainer's cpo_alpha. Plain DPO can lower the chosen answers' likelihood along with the
rejected ones (only their difference is pushed up); the NLL term holds the chosen answers up, which
matters when the chosen answers are the model's own correct samples. Logged as nll_loss.

A per-pair margin from the data is not taken: TRL 1.16's DPOTrainer uses none (the reward
model's Bradley-Terry loss is where the field uses one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from athanor.errors import AthanorError
from athanor.model.linear_ce import IGNORE_INDEX

LossType = Literal["sigmoid", "robust", "ipo", "hinge", "simpo"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
SMOOTHED = ("sigmoid", "robust", "simpo")  # the loss types that read label_smoothing


@dataclass
class PreferenceLossConfig:
    """The loss and its parameters, with TRL's field names (DPOConfig; simpo_gamma from CPOConfig)."""

    beta: float = 0.1
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0  # weight of the chosen answers' NLL added to the loss (RPO; CPO's cpo_alpha)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise AthanorError(f"unknown loss type {self.loss_type!r} (known: {', '.join(LOSS_TYPES)})",
                               field="loss_type")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise AthanorError(f"must be a number > 0, got {self.beta}", field="beta")
        eps = self.label_smoothing
        if self.loss_type in SMOOTHED and not 0 <= eps < 0.5:
            # eps is the probability that a label is flipped: 0.5 means the labels say nothing.
            raise AthanorError(f"must lie in [0, 0.5) (a label-flip probability), got {eps}",
                               field="label_smoothing")
        if self.loss_type not in SMOOTHED and eps != 0:
            raise AthanorError(f"{self.loss_type!r} has no label smoothing; it is used by "
                               f"{', '.join(SMOOTHED)}", field="label_smoothing")
        if not (math.isfinite(self.simpo_gamma) and self.simpo_gamma >= 0):
            raise AthanorError(f"must be a number >= 0, got {self.simpo_gamma}", field="simpo_gamma")
        if not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise AthanorError(f"must be a number >= 0, got {self.rpo_alpha}", field="rpo_alpha")


class Logps(NamedTuple):
    """Per-sequence log-prob of the answer, summed over its tokens, and the number of those tokens."""

    sum: torch.Tensor  # (B,) float32
    count: torch.Tensor  # (B,) int64

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)


def sequence_logps(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Logps:
    """The model's log-probs of the answer tokens, summed per row, for inputs and targets (B, T).

    Targets are aligned with the inputs as everywhere in athanor (train/sft.py): the model reads
    ids[:-1] and position t is scored against ids[t + 1], so the shift is done by whoever builds
    the targets; prompt and padding positions hold -100 and count for nothing. The model's fused
    head scores only the answer positions and never builds the (B, T, vocab) logits (their
    log-softmax and its gradient were most of a DPO step's memory). Computed in fp32.
    """
    token_logps = model(inputs, targets=targets, token_logprobs=True)
    return Logps(token_logps.sum(-1), (targets != IGNORE_INDEX).sum(-1))


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): the logistic loss with labels flipped w.p. eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def preference_loss(policy_chosen: Logps, policy_rejected: Logps, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, config: PreferenceLossConfig
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over the pairs and TRL's metrics (detached 0-dim tensors).

    `ref_chosen`/`ref_rejected` are the reference's summed log-probs (B,) of the same answers (a
    frozen copy, the base with the adapter off, or precomputed); None for "simpo", which has none.
    """
    beta, eps = config.beta, config.label_smoothing
    if config.loss_type == "simpo":
        chosen, rejected = policy_chosen.mean, policy_rejected.mean
        losses = _smoothed_logistic(beta * (chosen - rejected) - config.simpo_gamma, eps)
        logps_chosen, logps_rejected = chosen, rejected  # CPOTrainer logs the averages
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss type {config.loss_type!r} needs the reference's log-probs")
        chosen, rejected = policy_chosen.sum - ref_chosen, policy_rejected.sum - ref_rejected
        logps_chosen, logps_rejected = policy_chosen.sum, policy_rejected.sum
        h = chosen - rejected
        if config.loss_type == "sigmoid":
            losses = _smoothed_logistic(beta * h, eps)
        elif config.loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        elif config.loss_type == "hinge":
            losses = torch.relu(1 - beta * h)
        else:  # ipo
            h_per_token = chosen / policy_chosen.count.clamp(min=1) - rejected / policy_rejected.count.clamp(min=1)
            losses = (h_per_token - 1 / (2 * beta)) ** 2
    reward_chosen, reward_rejected = beta * chosen.detach(), beta * rejected.detach()
    metrics = {
        "rewards/chosen": reward_chosen.mean(),
        "rewards/rejected": reward_rejected.mean(),
        "rewards/margins": (reward_chosen - reward_rejected).mean(),
        "rewards/accuracies": (reward_chosen > reward_rejected).float().mean(),
        "logps/chosen": logps_chosen.detach().mean(),
        "logps/rejected": logps_rejected.detach().mean(),
    }
    loss = losses.mean()
    if config.rpo_alpha:
        nll = -policy_chosen.sum.sum() / policy_chosen.count.sum().clamp(min=1)
        loss = loss + config.rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics
