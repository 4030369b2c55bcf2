"""The preference losses against TRL 1.16 on the same batch, policy and reference (skip when absent).

TRL's side runs its own trainers on real forward outputs: DPOTrainer.compute_loss (reference as a
second model, `precompute_ref_log_probs=False`, the default) and, for SimPO, CPOTrainer (in
trl.experimental) with `cpo_alpha=0`, since the SimPO paper has no NLL term. Both in fp32 with
`bf16=False`: TRL's configs default to bf16 autocast, which its reference pass applies even
outside a training step. Everything else is left at TRL's defaults (`ld_alpha=None`,
`use_weighting=False`, `f_divergence_type="reverse_kl"`, one loss type with weight 1; no
truncation with `max_length=None`). Ours runs athanor's model (load_pretrained on the same
checkpoints) through sequence_logps and preference_loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel
from athanor.train.preference_loss import Logps, PreferenceLossConfig, preference_loss, sequence_logps

pytestmark = pytest.mark.ref
BETA = 0.5
PAIRS = [{"prompt": "What is 2+2?", "chosen": " 4", "rejected": " five, I think"},
         {"prompt": "Name a colour.", "chosen": " Blue is one.", "rejected": " Seven"},
         {"prompt": "Say hello.", "chosen": " Hello there, friend.", "rejected": " No."}]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A policy and a different reference, random tiny models saved in the transformers layout."""
    out = tmp_path_factory.mktemp("preference")
    for seed, name in enumerate(["policy", "ref"]):
        torch.manual_seed(seed)
        save_pretrained(LlamaModel(tiny_model_config()), out / name)
    return out


def _hf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _ours(model_dir: Path, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[Logps, Logps]:
    """athanor's log-probs of the rows [chosen..., rejected...] that TRL scores, labels -100 off the answers."""
    x, y = input_ids[:, :-1], labels[:, 1:]
    with torch.no_grad():
        logps = sequence_logps(load_pretrained(model_dir), x, y)
    (chosen, rejected), (n_chosen, n_rejected) = logps.sum.chunk(2), logps.count.chunk(2)
    return Logps(chosen, n_chosen), Logps(rejected, n_rejected)


def _assert_same(ours_loss: torch.Tensor, ours_metrics: dict, trl_loss: float, trl_metrics: dict) -> None:
    assert float(ours_loss) == pytest.approx(trl_loss, rel=1e-5)
    for name in METRICS:
        assert float(ours_metrics[name]) == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-7), name


# cDPO (sigmoid with label smoothing): TRL 1.16's "sigmoid" ignores label_smoothing; its "aot" loss
# on a batch of ONE pair (sorting one value changes nothing) is exactly -(1-eps) log s(bh) - eps log s(-bh).
# RPO (rpo_alpha): TRL 1.16 adds the chosen answers' NLL as a second loss type, "sft", weighted.
@pytest.mark.parametrize(("loss_type", "eps", "trl_loss_type", "n_pairs", "rpo_alpha"), [
    ("sigmoid", 0.0, "sigmoid", 3, 0.0), ("robust", 0.1, "robust", 3, 0.0), ("ipo", 0.0, "ipo", 3, 0.0),
    ("hinge", 0.0, "hinge", 3, 0.0), ("sigmoid", 0.1, "aot", 1, 0.0), ("sigmoid", 0.0, "sigmoid", 3, 0.7)])
def test_dpo_losses_and_metrics_equal_trl(tmp_path, tokenizer_dir, checkpoints, loss_type, eps, trl_loss_type,
                                          n_pairs, rpo_alpha):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=n_pairs, max_length=None, beta=BETA,
                         loss_type=[trl_loss_type] + ["sft"] * bool(rpo_alpha),
                         loss_weights=[1.0] + [rpo_alpha] * bool(rpo_alpha), label_smoothing=eps)
    trainer = trl.DPOTrainer(model=_hf(checkpoints / "policy"), ref_model=_hf(checkpoints / "ref"), args=args,
                             train_dataset=datasets.Dataset.from_list(PAIRS[:n_pairs]),
                             processing_class=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n_pairs)])
    trainer.model.train()  # TRL files the metrics under "train"
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
        # TRL's own per-sequence log-probs (its reference pass, run on either model).
        trl_policy = trainer.compute_ref_log_probs(trainer.model, batch)
        trl_ref = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    chosen, rejected = _ours(checkpoints / "policy", batch["input_ids"], labels)
    ref_chosen, ref_rejected = _ours(checkpoints / "ref", batch["input_ids"], labels)
    for ours, theirs in [(chosen.sum, trl_policy[0]), (rejected.sum, trl_policy[1]),
                         (ref_chosen.sum, trl_ref[0]), (ref_rejected.sum, trl_ref[1])]:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    loss, metrics = preference_loss(chosen, rejected, ref_chosen.sum, ref_rejected.sum,
                                    PreferenceLossConfig(beta=BETA, loss_type=loss_type, label_smoothing=eps,
                                                         rpo_alpha=rpo_alpha))
    assert ("nll_loss" in metrics) == bool(rpo_alpha)
    _assert_same(loss, metrics, trl_loss, trl_metrics)


@pytest.mark.parametrize(("eps", "cpo_alpha"), [(0.0, 0.0), (0.1, 0.0), (0.0, 0.7)])
def test_simpo_loss_and_metrics_equal_trl_cpo_trainer(tmp_path, tokenizer_dir, checkpoints, eps, cpo_alpha):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(PAIRS), beta=BETA, loss_type="simpo", cpo_alpha=cpo_alpha,
                     simpo_gamma=0.3, label_smoothing=eps)
    trainer = CPOTrainer(model=_hf(checkpoints / "policy"), args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                         processing_class=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    rows = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.pad_token_id)

    chosen, rejected = _ours(checkpoints / "policy", rows["concatenated_input_ids"], rows["concatenated_labels"])
    loss, metrics = preference_loss(chosen, rejected, None, None, PreferenceLossConfig(
        beta=BETA, loss_type="simpo", label_smoothing=eps, simpo_gamma=0.3, rpo_alpha=cpo_alpha))
    _assert_same(loss, metrics, float(trl_loss), trl_metrics)
    if cpo_alpha:
        assert float(metrics["nll_loss"]) == pytest.approx(float(trl_metrics["nll_loss"]), rel=1e-5)
