"""Preference tuning on the trainer loop: batches, the precomputed reference, a run that learns the
preference, LoRA, the CLI, and bad data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_base, tiny_model_config, toy_pairs_file

from athanor.data.preferences import encode_pair, load_pairs
from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained
from athanor.model.llama import LlamaModel
from athanor.tokenizer import Tokenizer
from athanor.train.dpo import DPORecipe, PreferenceDataConfig, PreferenceStage, collate, dpo, reference_logps
from athanor.train.finetune import LoraSettings
from athanor.train.loop import TrainConfig
from athanor.train.preference_loss import PreferenceLossConfig, sequence_logps


def _train(max_steps: int, **kw) -> TrainConfig:
    return TrainConfig(max_steps=max_steps, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2, eval_every=0,
                       eval_tokens=0, ckpt_every=0, log_every=1, weight_decay=0.0, **kw)


def test_collated_rows_score_each_answer_as_the_pair_alone(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Padding a pair into a batch changes nothing: its answers' log-probs equal those of the pair alone."""
    tok = Tokenizer.load(tokenizer_dir)
    pairs = [encode_pair(tok, p) for p in load_pairs(toy_pairs_file(tmp_path / "p.jsonl", 3))]
    pairs[1] = encode_pair(tok, load_pairs(toy_pairs_file(tmp_path / "q.jsonl", 1, start=123456789))[0])  # longer
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config()).double()
    batch = collate(pairs, tok.pad_id)
    assert batch["x"].shape[0] == 6 and (batch["y"][:3] != -100).sum() == sum(sum(p.chosen_mask) for p in pairs)
    together = sequence_logps(model, batch["x"], batch["y"]).sum
    for i, p in enumerate(pairs):
        alone = sequence_logps(model, collate([p], tok.pad_id)["x"], collate([p], tok.pad_id)["y"]).sum
        torch.testing.assert_close(together[[i, i + 3]], alone, rtol=1e-10, atol=1e-10)


def test_reference_makes_the_first_step_the_untrained_loss(tmp_path: Path, tokenizer_dir: Path) -> None:
    """With the policy still equal to the reference, DPO's loss is log 2 and every reward is 0."""
    tok = Tokenizer.load(tokenizer_dir)
    pairs = [encode_pair(tok, p) for p in load_pairs(toy_pairs_file(tmp_path / "p.jsonl", 5))]
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config())
    ref = reference_logps(model, pairs, tok.pad_id, batch_size=2)
    stage = PreferenceStage(pairs, ref, [], ref[:0], PreferenceLossConfig(), tok.pad_id, 5, seed=0)
    batch = stage.next_batch()
    loss, metrics = stage.loss_sum(model, batch)
    assert stage.loss_tokens(batch) == 5
    assert math.isclose(float(loss.detach()) / 5, math.log(2), rel_tol=1e-5)
    assert abs(metrics["rewards/margins"]) < 1e-5 and metrics["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_dpo_run_learns_the_preference_on_held_out_pairs(tmp_path: Path, tokenizer_dir: Path, loss_type: str) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    recipe = DPORecipe(out_dir=str(tmp_path / "dpo"), base=str(base),
                       data=PreferenceDataConfig(paths=[str(toy_pairs_file(tmp_path / "train.jsonl", 24))],
                                                 heldout=str(toy_pairs_file(tmp_path / "held.jsonl", 6, start=100))),
                       loss=PreferenceLossConfig(loss_type=loss_type), train=_train(25))
    result = dpo(recipe, show_progress=False)
    assert result["heldout_pairs"] == 6 and result["val_rewards/accuracies"] == 1.0
    assert result["val_rewards/margins"] > 0
    if loss_type == "sigmoid":
        assert result["val_loss"] < math.log(2) - 0.1  # below the untrained loss
    # The saved model is the tuned one: it prefers the chosen answer of a held-out pair by more than the base.
    tok = Tokenizer.load(tmp_path / "dpo")
    held = [encode_pair(tok, p) for p in load_pairs(tmp_path / "held.jsonl")]

    def margin(path: Path) -> float:
        scores = reference_logps(load_pretrained(path), held, tok.pad_id, batch_size=6)
        return float((scores[:, 0] - scores[:, 1]).mean())

    assert margin(tmp_path / "dpo") > margin(base) + 1.0
    assert json.loads((tmp_path / "dpo" / "eval.json").read_text())["loss_type"] == loss_type


def test_dpo_with_lora_saves_the_adapter_and_the_merged_model(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    recipe = DPORecipe(out_dir=str(tmp_path / "dpo"), base=str(base),
                       data=PreferenceDataConfig(paths=[str(toy_pairs_file(tmp_path / "train.jsonl", 40))],
                                                 heldout_fraction=0.2),
                       lora=LoraSettings(enabled=True, r=4, alpha=8), train=_train(4))
    result = dpo(recipe, show_progress=False)
    assert 0 < result["trainable_parameters"] < LlamaModel(tiny_model_config()).config.num_parameters()
    assert result["heldout_pairs"] > 0 and result["train_pairs"] + result["heldout_pairs"] == 40
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    tuned, start = load_pretrained(tmp_path / "dpo"), load_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), start.parameters(), strict=True))


def test_dpo_refuses_bad_data_and_settings_before_training(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    recipe = DPORecipe(out_dir=str(tmp_path / "dpo"), base=str(base), data=PreferenceDataConfig(paths=[str(bad)]),
                       train=_train(2))
    with pytest.raises(AthanorError, match=r"bad.jsonl:1: field .rejected.: chosen and rejected are the same"):
        dpo(recipe, show_progress=False)
    assert not (tmp_path / "dpo").exists()  # nothing written
    with pytest.raises(AthanorError, match="loss_type"):
        PreferenceLossConfig(loss_type="dpo")
    with pytest.raises(AthanorError, match="data.paths"):
        dpo(DPORecipe(out_dir=str(tmp_path / "dpo"), base=str(base), train=_train(2)), show_progress=False)


def test_dpo_command_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    pairs = toy_pairs_file(tmp_path / "train.jsonl", 20)
    run = subprocess.run([sys.executable, "-m", "athanor", "dpo", "--base", str(base), "--data", str(pairs),
                          "--loss", "ipo", "--out", str(tmp_path / "dpo"), "--quiet", "--train.max_steps=2",
                          "--train.batch_size=4", "--train.seq_len=64", "--data.heldout_fraction=0.25"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done (ipo, " in run.stdout and "reward accuracy" in run.stdout
    run = subprocess.run([sys.executable, "-m", "athanor", "dpo", "--base", str(base), "--data", str(pairs),
                          "--loss", "nope", "--out", str(tmp_path / "dpo2")], capture_output=True, text=True)
    assert run.returncode == 2 and "loss_type" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(("command", "key", "value"), [("dpo", ("loss", "rpo_alpha"), 1.0),
                                                        ("rm", ("data", "heldout_fraction"), 0.15)])
def test_shipped_recipe_runs_through_its_command(tmp_path: Path, tokenizer_dir: Path, command: str,
                                                 key: tuple[str, str], value: float) -> None:
    """recipes/dpo.yaml and recipes/rm.yaml, as their comments tell a user to run them (model, data and
    sizes turned down here): every key is known to the command and reaches the run."""
    recipe = Path(__file__).parents[1] / "recipes" / f"{command}.yaml"
    run = subprocess.run([sys.executable, "-m", "athanor", command, "--recipe", str(recipe),
                          "--base", str(tiny_base(tmp_path, tokenizer_dir)),
                          "--data", str(toy_pairs_file(tmp_path / "pairs.jsonl", 20)), "--out", str(tmp_path / "run"),
                          "--quiet", "--train.max_steps=2", "--train.seq_len=64", "--train.batch_size=4"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "run" / "athanor.yaml").read_text())
    assert saved[key[0]][key[1]] == value and saved["train"]["max_steps"] == 2
