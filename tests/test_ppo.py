"""PPO's arithmetic against values worked by hand (rl/ppo.py)."""

from __future__ import annotations

import math

import torch

from athanor.rl.ppo import AdaptiveKL, explained_variance, gae, kl_estimate, ppo_losses, token_rewards, whiten


def test_gae_by_hand_and_through_padding() -> None:
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 0.9, lambda 0.8:
    # delta_2 = 1 - 0.7 = 0.3                A_2 = 0.3
    # delta_1 = 0.9 * 0.7 - 0.6 = 0.03       A_1 = 0.03 + 0.72 * 0.3 = 0.246
    # delta_0 = 0.9 * 0.6 - 0.5 = 0.04       A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    expected_adv = torch.tensor([0.21712, 0.246, 0.3], dtype=torch.float64)
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    adv, ret = gae(r, v, torch.ones_like(r), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[0], expected_adv)
    torch.testing.assert_close(ret[0], expected_adv + v[0])
    # The same response after a prompt token and before padding: the masked tokens change nothing.
    def pad(x: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.cat([torch.full((1, 1), fill, dtype=x.dtype), x, torch.full((1, 2), fill, dtype=x.dtype)], 1)

    mask = pad(torch.ones_like(r), 0.0)
    adv2, ret2 = gae(pad(r, 5.0), pad(v, 9.0), mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv2[0, 1:4], expected_adv)
    assert adv2[0, 0] == 0 and (adv2[0, 4:] == 0).all() and (ret2 * (1 - mask) == 0).all()


def test_token_rewards_kl_penalty_score_and_missing_eos() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    r = token_rewards(torch.tensor([2.0, 1.0]), kl, mask, kl_coef=0.5, has_eos=torch.tensor([True, False]),
                      missing_eos_penalty=1.0)
    # Row 0: -0.5 * kl, and its score 2 at its last token; row 1 never stopped: score 1 - 1 = 0.
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.2, -0.25, 0.0, 0.0]]))


def test_clipped_policy_and_value_losses_by_hand() -> None:
    # Ratios 1.5, 0.5, 1.0 with advantages 1, -1, 2 and clip 0.2:
    #   token 0: max(-1.5, -1.2) = -1.2 (clipped)   token 1: max(0.5, 0.8) = 0.8 (clipped)   token 2: -2
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    # Values 0.5, -0.1, 0.3 around old values 0, clip 0.2, returns 1, 1, 0:
    #   clipped values 0.2, -0.1, 0.2; squared errors unclipped .25, 1.21, .09, clipped .64, 1.21, .04
    #   max .64, 1.21, .09 -> 0.5 * mean = 0.5 * 1.94 / 3
    values = torch.tensor([[0.5, -0.1, 0.3]])
    s = ppo_losses(logp, old, adv, values, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3),
                   cliprange=0.2, cliprange_value=0.2)
    assert math.isclose(float(s.policy_loss), (-1.2 + 0.8 - 2.0) / 3, rel_tol=1e-6)
    assert math.isclose(float(s.value_loss), 0.5 * 1.94 / 3, rel_tol=1e-6)
    assert math.isclose(float(s.clip_fraction), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(s.value_clip_fraction), 1 / 3, rel_tol=1e-6)
    assert math.isclose(float(s.approx_kl), 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3, rel_tol=1e-6)
    # Gradient: only the unclipped token moves the policy.
    logp.requires_grad_(True)
    ppo_losses(logp, old, adv, values, torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), 0.2, 0.2
               ).policy_loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.0 / 3]]))


def test_kl_estimators_average_to_the_true_kl() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    k1, k3 = kl_estimate(logp, logq, "k1"), kl_estimate(logp, logq, "k3")
    assert abs(float(k1.mean()) - true_kl) < 0.01 and abs(float(k3.mean()) - true_kl) < 0.01
    assert (k3 >= 0).all() and (k1 < 0).any()  # k3 is never negative; k1 is, per token


def test_whiten_explained_variance_and_the_adaptive_kl_controller() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, mask)
    kept = w[mask.bool()]
    assert abs(float(kept.mean())) < 1e-6 and abs(float(kept.var()) - 1) < 1e-4 and (w[~mask.bool()] == 0).all()
    assert abs(float(whiten(x, mask, shift_mean=False)[mask.bool()].mean()) - 3.0) < 1e-5
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    ones = torch.ones(1, 4)
    assert math.isclose(float(explained_variance(returns, returns, ones)), 1.0)
    assert abs(float(explained_variance(torch.full((1, 4), 1.5), returns, ones))) < 1e-6
    ctl = AdaptiveKL(value=0.1, target=6.0, horizon=10_000)
    assert math.isclose(ctl.update(kl=12.0, n=100), 0.1 * (1 + 0.2 * 100 / 10_000))  # error clipped at 0.2
    assert math.isclose(ctl.update(kl=5.4, n=100), 0.1 * 1.002 * (1 - 0.1 * 100 / 10_000))
