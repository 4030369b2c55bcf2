"""The preference losses (train/preference_loss.py) on a case worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model_config

from athanor.errors import AthanorError
from athanor.model.llama import LlamaModel
from athanor.train.preference_loss import Logps, PreferenceLossConfig, preference_loss, sequence_logps

# Two pairs. Summed answer log-probs of the policy (with token counts) and of the reference:
#   pair 1: chosen -4 (2 tokens), rejected -6 (3 tokens); reference -5 and -5
#   pair 2: chosen -3 (1 token),  rejected -2 (2 tokens); reference -2.5 and -3
# Log-ratios r: pair 1 chosen 1, rejected -1, h = 2; pair 2 chosen -0.5, rejected 1, h = -1.5.
# With beta = 0.5: beta h = 1 and -0.75.
BETA = 0.5


def _pairs(requires_grad: bool = False) -> tuple[Logps, Logps, torch.Tensor, torch.Tensor]:
    chosen = torch.tensor([-4.0, -3.0], requires_grad=requires_grad)
    rejected = torch.tensor([-6.0, -2.0], requires_grad=requires_grad)
    return (Logps(chosen, torch.tensor([2, 1])), Logps(rejected, torch.tensor([3, 2])),
            torch.tensor([-5.0, -2.5]), torch.tensor([-5.0, -3.0]))


def _softplus(z: float) -> float:  # -log sigma(-z)
    return math.log1p(math.exp(z))


HAND = {
    # -log sigma(beta h), averaged: (log(1 + e^-1) + log(1 + e^0.75)) / 2
    ("sigmoid", 0.0): (_softplus(-1) + _softplus(0.75)) / 2,
    # cDPO, eps = 0.1: 0.9 softplus(-beta h) + 0.1 softplus(beta h)
    ("sigmoid", 0.1): (0.9 * _softplus(-1) + 0.1 * _softplus(1) + 0.9 * _softplus(0.75) + 0.1 * _softplus(-0.75)) / 2,
    # robust, eps = 0.1: (0.9 softplus(-beta h) - 0.1 softplus(beta h)) / 0.8
    ("robust", 0.1): ((0.9 * _softplus(-1) - 0.1 * _softplus(1)) + (0.9 * _softplus(0.75) - 0.1 * _softplus(-0.75)))
    / 0.8 / 2,
    # hinge: max(0, 1 - 1) = 0 and max(0, 1 + 0.75) = 1.75
    ("hinge", 0.0): 0.875,
    # ipo, 1 / (2 beta) = 1: pair 1 (1/2 - (-1)/3 - 1)^2 = 1/36; pair 2 (-0.5/1 - 1/2 - 1)^2 = 4
    ("ipo", 0.0): (1 / 36 + 4) / 2,
    # simpo, gamma = 0.5, average log-probs: pair 1 -2 vs -2, z = 0 - 0.5; pair 2 -3 vs -1, z = -1 - 0.5
    ("simpo", 0.0): (_softplus(0.5) + _softplus(1.5)) / 2,
    ("simpo", 0.1): (0.9 * _softplus(0.5) + 0.1 * _softplus(-0.5) + 0.9 * _softplus(1.5) + 0.1 * _softplus(-1.5)) / 2,
}


def test_the_hand_worked_numbers_are_the_expected_ones():
    assert HAND[("sigmoid", 0.0)] == pytest.approx(0.7250663468)
    assert HAND[("robust", 0.1)] == pytest.approx(0.7094413468)
    assert HAND[("simpo", 0.0)] == pytest.approx(1.3377451311)


@pytest.mark.parametrize(("loss_type", "eps"), list(HAND))
def test_each_loss_equals_its_value_worked_by_hand(loss_type, eps):
    loss, _ = preference_loss(*_pairs(), PreferenceLossConfig(beta=BETA, loss_type=loss_type, label_smoothing=eps))
    assert float(loss) == pytest.approx(HAND[(loss_type, eps)], rel=1e-6)


def test_dpo_metrics_by_hand():
    _, m = preference_loss(*_pairs(), PreferenceLossConfig(beta=BETA))
    got = {k: float(v) for k, v in m.items()}
    # rewards beta r: chosen 0.5 and -0.25, rejected -0.5 and 0.5; pair 1 is ranked right, pair 2 not.
    assert got == pytest.approx({"rewards/chosen": 0.125, "rewards/rejected": 0.0, "rewards/margins": 0.125,
                                 "rewards/accuracies": 0.5, "logps/chosen": -3.5, "logps/rejected": -4.0})


def test_simpo_metrics_are_on_average_log_probs_and_a_tie_is_not_accurate():
    _, m = preference_loss(*_pairs()[:2], None, None, PreferenceLossConfig(beta=BETA, loss_type="simpo"))
    got = {k: float(v) for k, v in m.items()}
    # averages: chosen -2 and -3, rejected -2 and -1; pair 1 ties, pair 2 is ranked wrong.
    assert got == pytest.approx({"rewards/chosen": -1.25, "rewards/rejected": -0.75, "rewards/margins": -0.5,
                                 "rewards/accuracies": 0.0, "logps/chosen": -2.5, "logps/rejected": -1.5})


def test_dpo_is_ln2_when_the_policy_is_the_reference():
    chosen, rejected = Logps(torch.tensor([-3.0, -7.0]), torch.tensor([2, 4])), Logps(torch.tensor([-1.0, -9.0]),
                                                                                       torch.tensor([1, 5]))
    loss, m = preference_loss(chosen, rejected, chosen.sum, rejected.sum, PreferenceLossConfig())
    assert float(loss) == pytest.approx(math.log(2))
    assert float(m["rewards/margins"]) == 0.0 and float(m["rewards/accuracies"]) == 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "simpo", "hinge"])
def test_raising_the_chosen_log_prob_lowers_the_loss_and_the_rejected_raises_it(loss_type):
    chosen, rejected, ref_c, ref_r = _pairs(requires_grad=True)
    eps = 0.1 if loss_type == "robust" else 0.0
    loss, _ = preference_loss(chosen, rejected, ref_c, ref_r,
                              PreferenceLossConfig(beta=BETA, loss_type=loss_type, label_smoothing=eps))
    loss.backward()
    # Pair 2 is ranked wrong under every loss, so each pushes its chosen answer up and rejected down.
    assert chosen.sum.grad[1] < 0 < rejected.sum.grad[1]
    if loss_type == "sigmoid":  # d/d log pi(y_w) of mean -log sigma(beta h) = -beta sigma(-beta h) / 2
        expected = [-BETA * torch.sigmoid(torch.tensor(-z)).item() / 2 for z in (1.0, -0.75)]
        torch.testing.assert_close(chosen.sum.grad, torch.tensor(expected))
        torch.testing.assert_close(rejected.sum.grad, -torch.tensor(expected))
    if loss_type == "hinge":  # pair 1 sits exactly on the hinge (beta h = 1): no gradient
        assert chosen.sum.grad[0] == 0


def test_sequence_logps_align_like_the_sft_loss():
    """Summed over rows, the answer log-probs are minus the summed cross-entropy the model gives for the
    same targets (model(x, targets=y), the SFT loss): the same shift, the same -100 convention."""
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config()).eval()
    ids = torch.randint(0, 512, (3, 12))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :4] = y[1, :7] = y[2, 9:] = -100  # prompts, and padding after an answer
    with torch.no_grad():
        got = sequence_logps(model, x, y)
        assert float(got.sum.sum()) == pytest.approx(-float(model(x, targets=y)), rel=1e-5)
    assert got.count.tolist() == [7, 4, 9]
    torch.testing.assert_close(got.mean, got.sum / torch.tensor([7.0, 4.0, 9.0]))


def test_simpo_needs_no_reference_and_the_others_do():
    chosen, rejected, _, _ = _pairs()
    preference_loss(chosen, rejected, None, None, PreferenceLossConfig(loss_type="simpo"))
    with pytest.raises(ValueError, match="reference"):
        preference_loss(chosen, rejected, None, None, PreferenceLossConfig(loss_type="sigmoid"))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(loss_type="kto"), "field 'loss_type': unknown loss type 'kto'"),
    (dict(beta=0.0), "field 'beta': must be a number > 0"),
    (dict(beta=float("nan")), "field 'beta'"),
    (dict(loss_type="robust", label_smoothing=0.5), r"field 'label_smoothing': must lie in \[0, 0.5\)"),
    (dict(label_smoothing=-0.1), "field 'label_smoothing'"),
    (dict(loss_type="ipo", label_smoothing=0.1), "field 'label_smoothing': 'ipo' has no label smoothing"),
    (dict(loss_type="simpo", simpo_gamma=-1.0), "field 'simpo_gamma'"),
])
def test_bad_config_is_one_clear_error_naming_the_field(kwargs, message):
    with pytest.raises(AthanorError, match=message):
        PreferenceLossConfig(**kwargs)
