"""The GRPO loss against TRL 1.16's GRPOTrainer on the same tensors (skip when TRL is absent).

TRL's side is its own GRPOTrainer._compute_loss (through compute_loss), built on a tiny random
checkpoint with TRL's defaults except the settings under test, fp32 (`bf16=False`). It computes the
policy's per-token log-probs itself; athanor's grpo_loss gets those very log-probs from the same
trainer's forward (the same function, run again: bitwise the same on CPU), and both sides get the
same old and reference log-probs, advantages and completion mask (one completion fully masked, as
mask_truncated_completions leaves a truncated one). Compared: the loss (within 1e-6), its gradient
on every weight, and the metrics. One process, one micro-batch per optimizer step
(`current_gradient_accumulation_steps` 1), except where "dapo"'s normalizer is under test.

Not compared: at importance_sampling_level "sequence", TRL's clip-ratio means count a fully masked
completion as not clipped; athanor's leave it out (it has no ratio), so only loss and KL are compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from athanor.model.hf import save_pretrained
from athanor.model.llama import LlamaModel
from athanor.rl.grpo import GRPOLossConfig, group_advantages, grpo_loss, reward_metrics, weighted_rewards

pytestmark = pytest.mark.ref
B, G, T = 4, 2, 6
LENGTHS = [6, 3, 0, 4]  # completion tokens per row; row 2 truncated and masked out
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo") / "policy"
    torch.manual_seed(0)
    save_pretrained(LlamaModel(tiny_model_config()), out)
    return out


def _trainer(tmp_path: Path, policy_dir: Path, tokenizer_dir: Path, config: GRPOLossConfig,
             steps_per_generation: int):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=B,
        num_generations=G, steps_per_generation=steps_per_generation,
        max_completion_length=config.max_completion_length,
        beta=config.beta, epsilon=config.epsilon, epsilon_high=config.epsilon_high, loss_type=config.loss_type,
        importance_sampling_level=config.importance_sampling_level,
        use_bias_correction_kl=config.use_bias_correction_kl)
    model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "x"}] * B),
                              processing_class=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    return trainer


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return grads


@pytest.mark.parametrize(("config", "steps_per_generation"), [
    (GRPOLossConfig(loss_type="grpo", beta=0.1, epsilon_high=0.28), 1),
    (GRPOLossConfig(loss_type="bnpo", beta=0.1, epsilon_high=0.28), 1),
    (GRPOLossConfig(loss_type="dr_grpo", beta=0.1, epsilon_high=0.28), 1),
    (GRPOLossConfig(loss_type="dapo", beta=0.1, epsilon_high=0.28), 1),
    (GRPOLossConfig(loss_type="dapo"), 1),  # TRL's defaults: no reference
    (GRPOLossConfig(loss_type="dapo", beta=0.05, use_bias_correction_kl=False), 2),  # normalizer over 2 micro-batches
    (GRPOLossConfig(loss_type="bnpo", beta=0.05, use_bias_correction_kl=False), 1),
    (GRPOLossConfig(loss_type="grpo", beta=0.1, importance_sampling_level="sequence"), 1),
], ids=lambda x: str(x) if isinstance(x, int) else f"{x.loss_type}-beta{x.beta}-{x.importance_sampling_level}"
   f"-{'corrected' if x.use_bias_correction_kl else 'plain'}")
def test_grpo_loss_equals_trl(tmp_path, policy_dir, tokenizer_dir, config, steps_per_generation):
    trainer = _trainer(tmp_path, policy_dir, tokenizer_dir, config, steps_per_generation)
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, 500, (B, 3), generator=gen)
    completion_ids = torch.randint(3, 500, (B, T), generator=gen)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([torch.ones_like(prompt_ids),
                                                                                       mask], 1)
    with torch.no_grad():
        logp = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, T)[0]
    # Old and reference log-probs off the policy's by up to ~0.5 nats, so ratios leave the clip range both ways.
    old_logp = logp + 0.3 * torch.randn(B, T, generator=gen)
    ref_logp = logp + 0.3 * torch.randn(B, T, generator=gen)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0]), G).advantages
    # TRL's num_items_in_batch counts the completion tokens of the whole generation batch: with two micro-batches
    # per generation, say the other one had 7; TRL rescales it to one micro-batch (/ steps_per_generation).
    generation_tokens = mask.sum() + 7 * (steps_per_generation - 1)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old_logp,
              "num_items_in_batch": generation_tokens}
    if config.beta:
        inputs["ref_per_token_logps"] = ref_logp

    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = _grads(trainer.model)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    logp = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, T)[0]
    loss, metrics = grpo_loss(logp, old_logp, ref_logp if config.beta else None, advantages, mask, config,
                              num_items=generation_tokens / steps_per_generation)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), abs=1e-6, rel=0)
    for ours, theirs in zip(_grads(trainer.model), trl_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert ("kl" in metrics) == ("kl" in trl_metrics) == bool(config.beta)
    names = (("kl",) if config.beta else ()) + (CLIP_METRICS if config.importance_sampling_level == "token" else ())
    for name in names:
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-7), name
    assert trl_metrics["clip_ratio/region_mean"] > 0  # the clip was exercised


# Two reward functions, weighted 1 and 2; None where a function does not apply. Groups of two: scored
# normally, all equal (zero variance), one completion unscored by both, and the last alone in its group
# for the second function.
CORRECT = [1.0, 0.0, 2.0, 2.0, None, 3.0, 1.0, 4.0]
STYLE = [0.5, None, 0.1, 0.1, None, None, 0.0, 0.3]


def correct(completions, **kw) -> list[float | None]:
    return CORRECT


def style(completions, **kw) -> list[float | None]:
    return STYLE


@pytest.mark.parametrize(("trainer_name", "setting", "kind", "scale"), [
    ("GRPO", "group", "grpo", "group"), ("GRPO", "batch", "grpo", "batch"), ("GRPO", "none", "dr_grpo", None),
    ("RLOO", False, "rloo", "none"), ("RLOO", True, "rloo", "batch")])
def test_advantages_and_reward_metrics_equal_trl(tmp_path, policy_dir, tokenizer_dir, trainer_name, setting, kind,
                                                 scale):
    """TRL's trainer generates (with the tiny model, a few tokens) and scores completions with the two functions
    above; athanor's weighted_rewards and group_advantages get the same rewards."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    n = len(CORRECT)
    common = dict(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                  per_device_train_batch_size=n, num_generations=G, max_completion_length=3, reward_weights=[1.0, 2.0])
    if trainer_name == "GRPO":
        args = trl.GRPOConfig(**common, scale_rewards=setting)
    else:
        args = trl.RLOOConfig(**common, normalize_advantages=setting, beta=0.0)  # beta > 0 adds a KL to the reward
    trainer = getattr(trl, f"{trainer_name}Trainer")(
        model=transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
        reward_funcs=[correct, style], args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "x"}] * n),
        processing_class=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": f"question {i // G}"} for i in range(n)])
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    per_function = torch.tensor([[torch.nan if r is None else r for r in row]
                                 for row in zip(CORRECT, STYLE, strict=True)])
    weights = torch.tensor([1.0, 2.0])
    ours = group_advantages(weighted_rewards(per_function, weights), G, kind, scale)
    torch.testing.assert_close(ours.advantages, out["advantages"], rtol=1e-6, atol=1e-7)
    metrics = reward_metrics(per_function, ["correct", "style"], weights)
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-6), name
    # TRL's frac_reward_zero_std is per group, except with scale_rewards="batch": there, whether the batch's is 0.
    if setting != "batch":
        assert float(ours.zero_std_fraction) == pytest.approx(trl_metrics["frac_reward_zero_std"]) == 1 / 4
