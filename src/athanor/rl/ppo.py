"""The arithmetic of PPO for language models (RLHF as in InstructGPT), as pure functions of tensors.

A rollout is a prompt and the response the policy sampled, token by token. Following Ouyang et al.
(2022, "Training language models to follow instructions with human feedback") and the conventions
catalogued by Huang et al. (2022, "The N Implementation Details of RLHF with PPO"), which TRL's
PPOTrainer followed:

- Rewards per response token t: r_t = -kl_coef * kl_t, with kl_t an estimate of the per-token
  KL(policy || reference) from the two models' log-probs of the sampled token (k1: logp - ref_logp,
  Schulman's unbiased estimator; k3: (ratio - 1) - log ratio with ratio = ref_p / p, always >= 0);
  the reward model's scalar score is added at the response's last token. A response that never
  emitted EOS has `missing_eos_penalty` subtracted from its score first (the model must learn to stop).
- Optionally the rewards are whitened (scaled to unit variance over the batch's response tokens,
  mean kept): `whiten(..., shift_mean=False)`.
- Advantages by GAE (Schulman et al., 2016): delta_t = r_t + gamma V_{t+1} - V_t,
  A_t = delta_t + gamma lambda A_{t+1}, with V past the last token = 0; returns R_t = A_t + V_t.
  The advantages are then whitened (mean 0, variance 1 over the response tokens).
- Policy loss, clipped (Schulman et al., 2017): with rho = exp(logp_new - logp_old),
  max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), averaged over response tokens.
- Value loss, clipped around the rollout's values: 0.5 max((V - R)^2, (clip(V, V_old - eps_v,
  V_old + eps_v) - R)^2), averaged over response tokens.
- The KL coefficient is fixed, or adapted after each batch toward a target KL (Ziegler et al.,
  2019, "Fine-Tuning Language Models from Human Preferences"): e = clip(KL / target - 1, -0.2, 0.2),
  kl_coef <- kl_coef (1 + e n / horizon), n the batch's number of rollouts.

Masks are (B, T) with 1 on response tokens; every mean below is over those tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Variance over the masked entries, with Bessel's correction (as TRL's masked_var)."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is kept."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: Literal["k1", "k3"] = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio  # k3: (r - 1) - log r with r = p_ref / p


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  has_eos: torch.Tensor | None = None, missing_eos_penalty: float | None = None) -> torch.Tensor:
    """(B, T): -kl_coef * kl on every response token, plus each row's score (B,) at its last response token;
    rows without EOS (`has_eos` False) have `missing_eos_penalty` taken off their score first."""
    if missing_eos_penalty is not None and has_eos is not None:
        scores = scores - missing_eos_penalty * (~has_eos).to(scores.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # index of the last response token
    return rewards.index_put((torch.arange(len(scores), device=mask.device), last), scores, accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T), by generalized advantage estimation over the response tokens.
    Tokens outside the mask are skipped: their value and reward count as 0 and the recursion passes
    through them, so a response's last token bootstraps from nothing."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        next_value = torch.where(m > 0, values[:, t], next_value)
        advantages[:, t] = running * m
    return advantages, (advantages + values) * mask


@dataclass
class PPOLossStats:
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens whose ratio the clip bound
    approx_kl: torch.Tensor  # 0.5 mean (logp_new - logp_old)^2: how far this update moved from the rollout
    value_clip_fraction: torch.Tensor


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float,
               cliprange_value: float) -> PPOLossStats:
    """The clipped policy and value losses of one PPO minibatch (see the module docstring)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    v_unclipped_loss, v_clipped_loss = (values - returns) ** 2, (v_clipped - returns) ** 2
    return PPOLossStats(
        policy_loss=masked_mean(torch.maximum(unclipped, clipped), mask),
        value_loss=0.5 * masked_mean(torch.maximum(v_unclipped_loss, v_clipped_loss), mask),
        clip_fraction=masked_mean((clipped > unclipped).float(), mask).detach(),
        approx_kl=(0.5 * masked_mean((logp - old_logp) ** 2, mask)).detach(),
        value_clip_fraction=masked_mean((v_clipped_loss > v_unclipped_loss).float(), mask).detach(),
    )


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 when the value head predicts the returns, 0 when no better than their mean."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


@dataclass
class AdaptiveKL:
    """Ziegler et al.'s controller: moves `value` so that the measured KL approaches `target`."""

    value: float
    target: float
    horizon: float = 10_000.0

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon
        return self.value
