"""The reward model: its score read at the last non-pad token, the Bradley-Terry loss by hand, the Wilson
interval, a run that learns a preference on held-out pairs, LoRA with the score head, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_base, tiny_model_config, toy_pairs_file
from safetensors import safe_open

from athanor.data.preferences import encode_pair, load_pairs
from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel
from athanor.stats import wilson_interval
from athanor.tokenizer import Tokenizer
from athanor.train.dpo import PreferenceDataConfig
from athanor.train.finetune import LoraSettings
from athanor.train.loop import TrainConfig
from athanor.train.reward_model import RewardLossConfig, RewardModel, reward_loss
from athanor.train.rm import RewardStage, RMRecipe, collate, rm

PAD = 0


def _random_rm(seed: int = 0, **config) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel.from_language_model(LlamaModel(tiny_model_config(**config)), PAD, seed=seed + 1)


def _train(max_steps: int) -> TrainConfig:
    return TrainConfig(max_steps=max_steps, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2, eval_every=0,
                       eval_tokens=0, ckpt_every=0, log_every=1, weight_decay=0.0)


def test_loss_and_metrics_by_hand_with_margin_and_centering() -> None:
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    margin = torch.tensor([0.5, 0.0, 1.0])
    # -log sigma(z) = log(1 + e^-z) for z = r_c - r_r - m = 0.5, -1, -1.5; (r_c + r_r)^2 = 1, 0, 20.25.
    bt = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0)) + math.log1p(math.exp(1.5))) / 3
    loss, metrics = reward_loss(chosen, rejected, margin, RewardLossConfig(center_rewards_coefficient=0.01))
    assert float(loss) == pytest.approx(bt + 0.01 * (1 + 0 + 20.25) / 3, rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(1 / 3)  # strictly higher only in the first pair
    assert float(metrics["margin"]) == pytest.approx((1 - 1 - 0.5) / 3)  # the rewards' gap, not the data's margin
    assert (float(metrics["min_reward"]), float(metrics["max_reward"])) == (-0.5, 2.5)
    assert float(metrics["mean_reward"]) == pytest.approx(5.5 / 6)
    # Without margin or centering: plain Bradley-Terry, log 2 at a tie.
    loss, _ = reward_loss(torch.zeros(2), torch.zeros(2), None, RewardLossConfig())
    assert float(loss) == pytest.approx(math.log(2))
    with pytest.raises(AthanorError, match="center_rewards_coefficient"):
        RewardLossConfig(center_rewards_coefficient=-0.1)


def test_wilson_interval_known_values() -> None:
    # Brown, Cai & DasGupta (2001) / any table: 0 of 10 -> [0, 0.2775]; 5 of 10 -> [0.2366, 0.7634].
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    low, high = wilson_interval(12, 12)
    assert high == 1.0 and low == pytest.approx(0.75751, abs=1e-5)


def test_score_is_read_at_the_last_non_pad_token() -> None:
    """A right-padded batch scores each row as that row alone; the pad id is skipped wherever the row ends."""
    model = _random_rm().double()
    rows = [[5, 6, 7, 8, 9], [10, 11, 12], [13]]
    batch = torch.tensor([r + [PAD] * (5 - len(r)) for r in rows])
    together = model(batch)
    assert together.shape == (3,) and together.dtype == torch.float32
    for i, r in enumerate(rows):
        torch.testing.assert_close(together[i], model(torch.tensor([r]))[0], rtol=1e-6, atol=1e-7)
    # The head reads exactly the last real position's final hidden state.
    hidden = model.hidden_states(batch)
    expected = torch.stack([hidden[i, len(r) - 1] @ model.score.weight[0] for i, r in enumerate(rows)])
    torch.testing.assert_close(together, expected.float())


def test_saved_reward_model_loads_back_and_refuses_to_pass_for_a_language_model(tmp_path: Path) -> None:
    model = _random_rm()
    save_pretrained(model, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 and config["pad_token_id"] == PAD
    with safe_open(tmp_path / "rm" / "model.safetensors", "pt") as f:
        assert "score.weight" in f.keys() and not any(k.startswith("lm_head") for k in f.keys())
        assert f.get_tensor("score.weight").shape == (1, 64)
    back = load_pretrained(tmp_path / "rm", model_class=RewardModel)
    ids = torch.tensor([[3, 4, 5, PAD], [6, 7, 8, 9]])
    torch.testing.assert_close(back(ids), model(ids))
    with pytest.raises(AthanorError, match="LlamaForSequenceClassification"):
        load_pretrained(tmp_path / "rm")


def test_stage_batches_pairs_chosen_then_rejected_with_margins(tmp_path: Path, tokenizer_dir: Path) -> None:
    tok = Tokenizer.load(tokenizer_dir)
    pairs = [encode_pair(tok, p) for p in load_pairs(toy_pairs_file(tmp_path / "p.jsonl", 3, margin=0.5))]
    batch = collate(pairs, tok.pad_id)
    assert batch["input_ids"].shape[0] == 6 and batch["margin"].tolist() == [0.5] * 3
    first = pairs[0].prompt_ids + pairs[0].chosen_ids
    assert batch["input_ids"][0, :len(first)].tolist() == first
    stage = RewardStage(pairs, pairs, RewardLossConfig(), tok.pad_id, batch_size=3, seed=0)
    model = RewardModel.from_language_model(LlamaModel(tiny_model_config()), tok.pad_id)
    loss, metrics = stage.loss_sum(model, stage.next_batch())
    assert stage.loss_tokens(batch) == 3 and set(metrics) == {"accuracy", "margin", "min_reward", "mean_reward",
                                                              "max_reward"}
    held = stage.evaluate(model)
    assert held["val_accuracy_ci95_low"] <= held["val_accuracy"] <= held["val_accuracy_ci95_high"]


def test_rm_run_learns_the_preference_on_held_out_pairs(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    recipe = RMRecipe(out_dir=str(tmp_path / "rm"), base=str(base),
                      data=PreferenceDataConfig(paths=[str(toy_pairs_file(tmp_path / "train.jsonl", 24, margin=0.5))],
                                                heldout=str(toy_pairs_file(tmp_path / "held.jsonl", 12, start=100))),
                      loss=RewardLossConfig(center_rewards_coefficient=0.01), train=_train(20))
    result = rm(recipe, show_progress=False)
    assert result["heldout_pairs"] == 12 and result["val_accuracy"] == 1.0
    # Above chance with the interval: even its low end clears 50%.
    assert 0.5 < result["val_accuracy_ci95_low"] < 1.0 == result["val_accuracy_ci95_high"]
    assert result["val_loss"] < math.log(2) and result["val_margin"] > 0
    saved = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert saved["val_accuracy_interval"] == "Wilson score interval, 95%"
    assert saved["val_accuracy_ci95_low"] == result["val_accuracy_ci95_low"]
    # The saved model is the trained one: it scores each held-out chosen answer above its rejected one.
    tok = Tokenizer.load(tmp_path / "rm")
    held = [encode_pair(tok, p) for p in load_pairs(tmp_path / "held.jsonl")]
    with torch.no_grad():
        chosen, rejected = load_pretrained(tmp_path / "rm", model_class=RewardModel)(
            collate(held, tok.pad_id)["input_ids"]).chunk(2)
    assert bool((chosen > rejected).all())
    assert float((chosen - rejected).mean()) == pytest.approx(result["val_margin"], rel=1e-4)


def test_rm_with_lora_trains_the_score_head_whole(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    recipe = RMRecipe(out_dir=str(tmp_path / "rm"), base=str(base),
                      data=PreferenceDataConfig(paths=[str(toy_pairs_file(tmp_path / "train.jsonl", 20))],
                                                heldout_fraction=0.2),
                      lora=LoraSettings(enabled=True, r=4, alpha=8), train=_train(3))
    result = rm(recipe, show_progress=False)
    config = tiny_model_config()
    # Adapters on every linear layer of both blocks (7 each), r=4: (in + out) * 4 parameters each; + the head.
    layer = (64 + 64) * 4 + 2 * (64 + 32) * 4 + (64 + 64) * 4 + 2 * (64 + 128) * 4 + (128 + 64) * 4
    assert result["trainable_parameters"] == config.num_hidden_layers * layer + config.hidden_size
    adapter = tmp_path / "rm" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        head = f.get_tensor("base_model.model.score.weight")
    trained = load_pretrained(tmp_path / "rm", model_class=RewardModel)
    torch.testing.assert_close(trained.score.weight.detach(), head)
    untrained = RewardModel.from_language_model(load_pretrained(base), 0, seed=TrainConfig().seed)
    assert not torch.equal(head, untrained.score.weight.detach())  # the head moved from where it started


def test_rm_refuses_bad_data_before_writing(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}) + "\n")
    recipe = RMRecipe(out_dir=str(tmp_path / "rm"), base=str(base), data=PreferenceDataConfig(paths=[str(bad)]),
                      train=_train(2))
    with pytest.raises(AthanorError, match=r"bad.jsonl:1: field .margin.: must be a finite number"):
        rm(recipe, show_progress=False)
    assert not (tmp_path / "rm").exists()


def test_rm_command_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    pairs = toy_pairs_file(tmp_path / "train.jsonl", 20)
    run = subprocess.run([sys.executable, "-m", "athanor", "rm", "--base", str(base), "--data", str(pairs),
                          "--out", str(tmp_path / "rm"), "--quiet", "--train.max_steps=2", "--train.batch_size=4",
                          "--train.seq_len=64", "--data.heldout_fraction=0.25",
                          "--loss.center_rewards_coefficient=0.01"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done (reward model, " in run.stdout and "95% Wilson interval" in run.stdout
    assert json.loads((tmp_path / "rm" / "eval.json").read_text())["center_rewards_coefficient"] == 0.01
    run = subprocess.run([sys.executable, "-m", "athanor", "rm", "--base", str(base), "--data", str(pairs),
                          "--out", str(tmp_path / "rm2"), "--loss.center_rewards_coefficient=-1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "center_rewards_coefficient" in run.stderr and "Traceback" not in run.stderr
