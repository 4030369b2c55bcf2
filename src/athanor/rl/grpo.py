"""The arithmetic of GRPO and its relatives, as pure functions of tensors.

Each prompt is answered G times (a group); a batch holds B = n_prompts * G completions, the G of a
prompt next to each other. Following GRPO (Shao et al. 2024, "DeepSeekMath"), with TRL 1.16's
GRPOTrainer conventions where the papers leave a choice:

- Rewards: F reward functions score each completion; a function may return None (NaN here) for a
  completion it does not apply to. The reward is sum_f w_f r_f over the functions that scored it
  (a weight of 0 logs a function without rewarding it); a completion no function scored has no
  reward (NaN), is left out of its group's baseline and gets advantage 0.
- Advantages, with r the rewards of one group and eps = 1e-4:
  - "grpo": (r - mean(r)) / (std(r) + eps), std with Bessel's correction, of the group
    (scale "group", GRPO) or of the whole batch (scale "batch": Liu et al. 2025, "Part I: Tricks or
    Traps? A Deep Dive into RL for LLM Reasoning", Lite PPO);
  - "dr_grpo": r - mean(r), no division: dividing by the group's std weighs questions by how easy
    or hard they are (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective", Dr. GRPO); TRL's scale_rewards="none";
  - "rloo": r_i - mean of the group's other completions (leave-one-out baseline; Kool et al. 2019,
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs"), optionally whitened over the batch (scale "batch"); TRL 1.16
    has this in a separate RLOOTrainer (normalize_advantages), whose loss is not this module's.
- Per token t of completion i, with rho = exp(logp - old_logp) (old: the policy that sampled the
  batch, so several updates per batch stay near it), A_i the completion's advantage:
  l_t = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta k3_t,
  k3_t = exp(ref - logp) - (ref - logp) - 1 (Schulman's k3 estimate of KL(policy || reference),
  always >= 0). eps_high > eps_low is DAPO's "clip-higher" (Yu et al. 2025, "DAPO"). As TRL 1.16
  does by default (use_bias_correction_kl), k3_t is multiplied by rho, which makes its gradient the
  unbiased reverse-KL gradient for samples from the old policy (DeepSeek-V3.2 report).
  With importance_sampling_level "sequence" (GSPO: Zheng et al. 2025, "Group Sequence Policy
  Optimization"), rho is one number per completion: exp of the mean of its tokens' log-ratios.
- The loss aggregates l over the mask (1 on the completion tokens that count):
  - "grpo": each completion's token mean, then the mean over completions (DeepSeekMath);
  - "bnpo": the token sum over the batch / the batch's token count;
  - "dr_grpo": the token sum / (B * max_completion_length), a constant (Dr. GRPO);
  - "dapo": the token sum / the token count of everything one optimizer step sees (DAPO's
    token-level loss). TRL 1.16 divides by its generation batch's token count across processes,
    rescaled to one gradient-accumulation window; in one process with one micro-batch per step,
    as by default here, that is this batch's count and "dapo" equals "bnpo".
  The first two weigh a token by its completion's (or batch's) length, the last two do not.
- Truncated completions (no EOS within max_completion_length) can be masked out of the loss
  entirely (DAPO's overlong filtering; TRL's mask_truncated_completions).

Masks are (B, T) with 1 on completion tokens. Metrics carry TRL's names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from athanor.errors import AthanorError
from athanor.rl.ppo import masked_mean

AdvantageKind = Literal["grpo", "dr_grpo", "rloo"]
Scale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
STD_EPS = 1e-4  # added to a std before dividing by it (TRL's)
# Each advantage kind's scales, its default first: one name for each of TRL's settings.
SCALES: dict[str, tuple[str, ...]] = {"grpo": ("group", "batch"), "dr_grpo": ("none",), "rloo": ("none", "batch")}


@dataclass
class GRPOLossConfig:
    """The loss's parameters, with TRL's GRPOConfig names and defaults."""

    beta: float = 0.0  # weight of the k3 KL to the reference; 0: no reference needed
    epsilon: float = 0.2  # the ratio's lower clip, 1 - epsilon
    epsilon_high: float | None = None  # the upper clip, 1 + epsilon_high; None: epsilon (DAPO uses 0.28)
    loss_type: LossType = "dapo"
    max_completion_length: int = 512  # dr_grpo's constant
    importance_sampling_level: Literal["token", "sequence"] = "token"
    use_bias_correction_kl: bool = True  # multiply the KL term by the ratio

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise AthanorError(f"unknown loss type {self.loss_type!r} (known: {', '.join(LOSS_TYPES)})",
                               field="loss_type")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise AthanorError(f"must be 'token' or 'sequence', got {self.importance_sampling_level!r}",
                               field="importance_sampling_level")
        for name in ("beta", "epsilon", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise AthanorError(f"must be a number >= 0, got {value}", field=name)
        if self.max_completion_length < 1:
            raise AthanorError(f"must be at least 1, got {self.max_completion_length}", field="max_completion_length")

    @property
    def clip_range(self) -> tuple[float, float]:
        """The ratio's clip interval, [1 - epsilon, 1 + epsilon_high]."""
        return 1 - self.epsilon, 1 + (self.epsilon if self.epsilon_high is None else self.epsilon_high)


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Std over the non-NaN entries with Bessel's correction; NaN where fewer than two."""
    keep = ~torch.isnan(x)
    n = keep.sum() if dim is None else keep.sum(dim)
    mean = torch.nanmean(x) if dim is None else torch.nanmean(x, dim, keepdim=True)
    sq = torch.nanmean((x - mean) ** 2) if dim is None else torch.nanmean((x - mean) ** 2, dim)
    return torch.where(n > 1, sq * n / (n - 1).clamp(min=1), torch.nan).sqrt()


def weighted_rewards(per_function: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) sum_f w_f r_f of (B, F) rewards over the functions that scored each row (NaN: did not);
    NaN for a row no function scored. Weights default to 1."""
    if weights is None:
        weights = torch.ones(per_function.shape[1], dtype=per_function.dtype, device=per_function.device)
    rewards = (per_function * weights).nansum(1)
    return rewards.masked_fill(torch.isnan(per_function).all(1), torch.nan)


def reward_metrics(per_function: torch.Tensor, names: list[str], weights: torch.Tensor | None = None
                   ) -> dict[str, float]:
    """Mean and std of each function's rewards over the rows it scored, and of the weighted sum."""
    metrics = {}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = float(torch.nanmean(per_function[:, i]))
        metrics[f"rewards/{name}/std"] = float(nanstd(per_function[:, i]))
    rewards = weighted_rewards(per_function, weights)
    metrics["reward"], metrics["reward_std"] = float(torch.nanmean(rewards)), float(nanstd(rewards))
    return metrics


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # (B,)
    zero_std_fraction: torch.Tensor  # share of groups whose rewards are all equal: they teach nothing


def group_advantages(rewards: torch.Tensor, group_size: int, kind: AdvantageKind = "grpo",
                     scale: Scale | None = None) -> GroupAdvantages:
    """Advantages (B,) of rewards (B,) in groups of `group_size` consecutive rows (module docstring).

    `scale`: None takes the kind's default ("group" for grpo, "none" otherwise). TRL 1.16's
    GRPOTrainer scale_rewards "group"/"batch"/"none" is kind "grpo" with scale "group"/"batch" and
    kind "dr_grpo"; RLOOTrainer's normalize_advantages False/True is kind "rloo" with "none"/"batch".
    NaN rewards (unscored) are left out of the baselines and stds and get advantage 0.
    """
    if kind not in SCALES:
        raise ValueError(f"unknown advantage kind {kind!r} (known: {', '.join(SCALES)})")
    scale = SCALES[kind][0] if scale is None else scale
    if scale not in SCALES[kind]:
        raise ValueError(f"advantage kind {kind!r} takes scale {' or '.join(SCALES[kind])}, not {scale!r}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} >= 2")
    groups = rewards.view(-1, group_size)
    group_std = nanstd(groups, dim=1)
    if kind == "rloo":
        scored = (~torch.isnan(groups)).sum(1, keepdim=True)
        baseline = (groups.nansum(1, keepdim=True) - groups) / (scored - 1)  # NaN when alone in its group
        advantages = (groups - baseline).view(-1)
        if scale == "batch":
            advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + STD_EPS)
    else:
        advantages = groups - torch.nanmean(groups, 1, keepdim=True)
        if scale == "group":
            advantages = advantages / (group_std[:, None] + STD_EPS)
        elif scale == "batch":
            advantages = advantages / (nanstd(rewards) + STD_EPS)
        advantages = advantages.view(-1)
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std))
    return GroupAdvantages(torch.nan_to_num(advantages, nan=0.0), zero_std.float().mean())


def mask_truncated(mask: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
    """The mask with every completion that did not end in EOS (has_eos (B,) False) zeroed: a cut-off
    answer is neither right nor wrong, so it should not be penalized for its length (DAPO)."""
    return mask * has_eos[:, None].to(mask.dtype)


def completion_length_metrics(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """Lengths (B,) of the completions in tokens, and which were cut off (B,): TRL's completions/*."""
    lengths = lengths.float()
    terminated = lengths[~truncated]
    if terminated.numel() == 0:
        terminated = torch.zeros(1)
    return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.float().mean()),
            "completions/mean_terminated_length": float(terminated.mean()),
            "completions/min_terminated_length": float(terminated.min()),
            "completions/max_terminated_length": float(terminated.max())}


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1 per token: Schulman's k3, >= 0, unbiased for samples of the policy."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) each row's mean over its masked tokens (0 for a row with none)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, config: GRPOLossConfig,
              num_items: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch and its metrics (detached), from per-token log-probs (B, T) of the sampled
    completion tokens under the policy being trained, the policy that sampled them (None: this one, the
    first update on a batch, where the ratio is 1 but its gradient is not 0) and the reference (None
    when beta is 0), advantages (B,) and the mask (B, T).

    `num_items` is "dapo"'s normalizer: the completion-token count of everything one optimizer step
    sees. None: this batch's. When a step accumulates gradients over micro-batches, pass the step's
    total (divided by the number of processes when their gradients are averaged) and sum the losses.
    The other loss types are means of their batch: average them over micro-batches.
    """
    mask = mask.to(logp.dtype)
    old_logp = logp.detach() if old_logp is None else old_logp
    log_ratio = logp - old_logp
    if config.importance_sampling_level == "sequence":
        log_ratio = _sequence_mean(log_ratio, mask)[:, None]  # (B, 1), broadcast over the tokens
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    clipped = ratio.clamp(*config.clip_range)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if config.beta != 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference's log-probs")
        kl = k3_kl(logp, ref_logp)
        if config.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + config.beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    per_token = per_token.expand_as(mask)
    if config.loss_type == "grpo":
        loss = _sequence_mean(per_token, mask).mean()
    else:
        normalizer = {"bnpo": mask.sum().clamp(min=1),
                      "dr_grpo": mask.shape[0] * config.max_completion_length,
                      "dapo": mask.sum().clamp(min=1) if num_items is None else num_items}[config.loss_type]
        loss = (per_token * mask).sum() / normalizer
    metrics.update(_clip_metrics(ratio.detach(), adv, mask, config))
    return loss, metrics


def _clip_metrics(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, config: GRPOLossConfig
                  ) -> dict[str, torch.Tensor]:
    """Shares of tokens (of completions, at the sequence level) whose clip bound the objective: the
    ratio fell below 1 - eps_low with A < 0, or rose above 1 + eps_high with A > 0; and the smallest
    low / largest high share of a single completion."""
    lo, hi = config.clip_range
    low = ((ratio < lo) & (adv < 0)).to(mask.dtype)
    high = ((ratio > hi) & (adv > 0)).to(mask.dtype)
    if ratio.shape[1] == 1:  # one ratio per completion: count completions that have tokens
        mask = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
    low, high = low.expand_as(mask), high.expand_as(mask)
    rows = mask.sum(-1) > 0
    if not rows.any():  # everything masked (all truncated): nothing was clipped
        rows = torch.ones_like(rows)
    return {"clip_ratio/low_mean": masked_mean(low, mask),
            "clip_ratio/high_mean": masked_mean(high, mask),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask),
            "clip_ratio/low_min": _sequence_mean(low, mask)[rows].min(),
            "clip_ratio/high_max": _sequence_mean(high, mask)[rows].max()}
