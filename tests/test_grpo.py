"""GRPO's arithmetic against values worked by hand (rl/grpo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from athanor.errors import AthanorError
from athanor.rl.grpo import (
    GRPOLossConfig,
    completion_length_metrics,
    group_advantages,
    grpo_loss,
    mask_truncated,
    reward_metrics,
    weighted_rewards,
)

NAN = math.nan
EPS = 1e-4  # added to the std before dividing


def test_grpo_advantages_group_and_batch_scale_and_zero_std_groups() -> None:
    # Groups [1, 3] and [2, 2]: means 2 and 2; group stds sqrt(2) and 0; the batch's std sqrt(2/3).
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])
    out = group_advantages(rewards, 2)
    s = 1 / (math.sqrt(2) + EPS)
    torch.testing.assert_close(out.advantages, torch.tensor([-s, s, 0.0, 0.0]))
    assert float(out.zero_std_fraction) == 0.5
    b = 1 / (math.sqrt(2 / 3) + EPS)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch").advantages, torch.tensor([-b, b, 0, 0]))
    torch.testing.assert_close(group_advantages(rewards, 2, kind="dr_grpo").advantages,
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    # Groups are consecutive rows: [1, 2] and [3, 2] would give other advantages.
    assert not torch.allclose(group_advantages(torch.tensor([1.0, 2.0, 3.0, 2.0]), 2).advantages, out.advantages)


def test_rloo_leave_one_out_baseline_and_batch_whitening() -> None:
    # [1, 2, 6]: the others' means are 4, 3.5, 1.5.
    out = group_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, kind="rloo")
    torch.testing.assert_close(out.advantages, torch.tensor([-3.0, -1.5, 4.5]))
    # Whitened: mean 0 already; std of [-3, -1.5, 4.5] with Bessel = sqrt((9 + 2.25 + 20.25) / 2).
    std = math.sqrt(31.5 / 2)
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, kind="rloo", scale="batch")
                               .advantages, torch.tensor([-3.0, -1.5, 4.5]) / (std + EPS))


def test_unscored_completions_are_left_out_and_get_no_advantage() -> None:
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0, NAN, NAN])
    s = 1 / (math.sqrt(2) + EPS)
    torch.testing.assert_close(group_advantages(rewards, 3).advantages, torch.tensor([-s, 0.0, s, 0.0, 0.0, 0.0]))
    # RLOO: each scored completion's baseline is the other scored one; alone in its group: no baseline, 0.
    torch.testing.assert_close(group_advantages(rewards, 3, kind="rloo").advantages,
                               torch.tensor([-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]))


def test_advantage_settings_that_do_not_exist_are_refused() -> None:
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, kind="dr_grpo", scale="group")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_weighted_rewards_skip_unscored_and_weight_zero_only_logs() -> None:
    per_function = torch.tensor([[1.0, NAN], [NAN, NAN], [2.0, 3.0]])
    rewards = weighted_rewards(per_function, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(rewards, torch.tensor([0.5, NAN, 7.0]), equal_nan=True)
    per_function = torch.tensor([[1.0, 4.0], [3.0, 8.0]])
    metrics = reward_metrics(per_function, ["correct", "length"], torch.tensor([1.0, 0.0]))
    assert metrics["reward"] == 2.0 and metrics["reward_std"] == pytest.approx(math.sqrt(2))
    assert metrics["rewards/length/mean"] == 6.0 and metrics["rewards/length/std"] == pytest.approx(math.sqrt(8))


def _loss(loss_type: str, **kw) -> float:
    # On-policy (ratio 1), no KL: per-token loss -A, rows [-1, -1, -1] and [2].
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = grpo_loss(logp, None, None, torch.tensor([1.0, -2.0]), mask,
                        GRPOLossConfig(loss_type=loss_type, max_completion_length=5), **kw)
    return float(loss)


def test_each_aggregation_by_hand() -> None:
    assert _loss("grpo") == pytest.approx((-1 + 2) / 2)  # each row's mean, then their mean
    assert _loss("bnpo") == pytest.approx((-3 + 2) / 4)  # over the batch's 4 tokens
    assert _loss("dr_grpo") == pytest.approx((-3 + 2) / (2 * 5))  # B * max_completion_length
    assert _loss("dapo") == pytest.approx((-3 + 2) / 4)
    assert _loss("dapo", num_items=10) == pytest.approx((-3 + 2) / 10)  # the optimizer step's token count


def test_asymmetric_clip_its_gradient_and_clip_metrics() -> None:
    # Row 0, A = 1: ratios 1.5 (clipped to 1 + 0.3) and 1.1. Row 1, A = -2: ratios 0.5 (clipped to 1 - 0.2)
    # and 1.5, not clipped: above 1 + eps only a positive advantage is clipped.
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1], [0.5, 1.5]])).requires_grad_(True)
    config = GRPOLossConfig(epsilon=0.2, epsilon_high=0.3, loss_type="bnpo")
    loss, m = grpo_loss(logp, old, None, torch.tensor([1.0, -2.0]), torch.ones(2, 2), config)
    assert float(loss.detach()) == pytest.approx((-1.3 - 1.1 + 2 * 0.8 + 2 * 1.5) / 4)
    loss.backward()
    # Only unclipped tokens move the policy: d(-rho A)/dlogp = -rho A, over 4 tokens.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1 / 4], [0.0, 3.0 / 4]]))
    assert float(m["clip_ratio/low_mean"]) == 0.25 and float(m["clip_ratio/high_mean"]) == 0.25
    assert float(m["clip_ratio/region_mean"]) == 0.5
    assert float(m["clip_ratio/low_min"]) == 0.0 and float(m["clip_ratio/high_max"]) == 0.5
    assert "kl" not in m


def test_k3_kl_term_and_its_ratio_correction() -> None:
    # logp = log 0.5, ref = log 0.25: ref - logp = -log 2, k3 = 1/2 + log 2 - 1. A = 0 leaves the KL term alone.
    k3 = 0.5 + math.log(2) - 1
    logp = torch.full((1, 1), math.log(0.5), requires_grad=True)
    ref = torch.full((1, 1), math.log(0.25))
    for correct, old_shift in [(False, 0.0), (True, 0.0), (True, math.log(2))]:
        config = GRPOLossConfig(beta=0.1, use_bias_correction_kl=correct, loss_type="grpo")
        loss, m = grpo_loss(logp, logp.detach() - old_shift, ref, torch.zeros(1), torch.ones(1, 1), config)
        ratio = math.exp(old_shift)
        assert float(loss.detach()) == pytest.approx(0.1 * k3 * ratio) and float(m["kl"]) == pytest.approx(k3 * ratio)
        (grad,) = torch.autograd.grad(loss, logp)
        # d k3 / d logp = 1 - exp(ref - logp) = 1/2; the corrected term adds k3's own value (d ratio/d logp = ratio).
        assert float(grad) == pytest.approx(0.1 * ratio * (0.5 + (k3 if correct else 0.0)))


def test_sequence_level_ratio_is_the_geometric_mean_of_the_tokens() -> None:
    # Log-ratios 0.3 and -0.2 on the row's two tokens (a third masked): GSPO's ratio exp(0.05), inside the clip.
    logp = torch.tensor([[0.3, -0.2, 3.0]])
    mask = torch.tensor([[1, 1, 0]])
    seq = GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    loss, m = grpo_loss(logp, torch.zeros(1, 3), None, torch.ones(1), mask, seq)
    assert float(loss) == pytest.approx(-math.exp(0.05)) and float(m["clip_ratio/high_mean"]) == 0.0
    # Per token: exp(0.3) = 1.35 is clipped to 1.2, exp(-0.2) is not.
    loss, m = grpo_loss(logp, torch.zeros(1, 3), None, torch.ones(1), mask, GRPOLossConfig(loss_type="grpo"))
    assert float(loss) == pytest.approx(-(1.2 + math.exp(-0.2)) / 2) and float(m["clip_ratio/high_mean"]) == 0.5


def test_truncated_completions_leave_the_loss() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    masked = mask_truncated(mask, torch.tensor([False, True]))
    torch.testing.assert_close(masked, torch.tensor([[0, 0, 0], [1, 1, 0]]))
    loss, m = grpo_loss(torch.zeros(2, 3), None, None, torch.tensor([5.0, 1.0]), masked, GRPOLossConfig())
    assert float(loss) == pytest.approx(-1.0)  # only row 1's two tokens, A = 1
    assert float(m["clip_ratio/low_min"]) == 0.0
    metrics = completion_length_metrics(torch.tensor([3, 2]), torch.tensor([True, False]))
    assert metrics["completions/mean_length"] == 2.5 and metrics["completions/clipped_ratio"] == 0.5
    assert metrics["completions/mean_terminated_length"] == 2.0


def test_config_errors_name_the_field() -> None:
    with pytest.raises(AthanorError, match="'loss_type'"):
        GRPOLossConfig(loss_type="ppo")
    with pytest.raises(AthanorError, match="'epsilon_high'"):
        GRPOLossConfig(epsilon_high=-0.1)
