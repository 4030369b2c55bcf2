"""PPO on the trainer loop (train/ppo.py): a toy reward with a known best answer is learned with the KL
bounded, the LoRA reference is the base, a run resumes exactly, the saved model is a plain LM, and bad
reward models are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_base, tiny_model_config, toy_pairs_file

from athanor.cli import main
from athanor.data.synth import Task
from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel
from athanor.tokenizer import Tokenizer, TokenizerConfig
from athanor.train.finetune import LoraSettings
from athanor.train.loop import TrainConfig
from athanor.train.ppo import PPOConfig, PPORecipe, TaskDataConfig, ppo
from athanor.train.reward_model import RewardModel

FIRST_HALF = set("abcdefghijklm")


def first_half_letters(tasks: list[Task], replies: list[str]) -> list[float]:
    """The share of a reply's characters that are letters a-m: best answer, a reply of only those."""
    return [sum(c in FIRST_HALF for c in r) / max(len(r), 1) for r in replies]


def _recipe(tmp_path: Path, base: Path, steps: int, lora: bool = False, **ppo_kw) -> PPORecipe:
    """32 prompts of 4 new tokens per rollout, 2 epochs of 2 minibatches: 4 steps a rollout."""
    cfg = dict(rollout_batch=32, ppo_epochs=2, max_new_tokens=4)
    cfg.update(ppo_kw)
    return PPORecipe(out_dir=str(tmp_path / "ppo"), base=str(base), reward="verifier",
                     data=TaskDataConfig(synth_train=64, synth_heldout=0, synth_kinds=["arithmetic"]),
                     ppo=PPOConfig(**cfg), lora=LoraSettings(enabled=lora),
                     train=TrainConfig(max_steps=steps, batch_size=16, lr=1e-3, schedule="constant", warmup_steps=0,
                                       eval_every=0, eval_tokens=0, ckpt_every=0, log_every=4, weight_decay=0.0))


def _rollouts(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "rollout" in r]


def test_ppo_raises_a_known_reward_and_keeps_the_kl_bounded(tmp_path: Path, tokenizer_dir: Path) -> None:
    """30 rollouts on a random tiny model: the share of a-m letters climbs from ~0.2 well past 0.35 (with the
    advantages' sign flipped it falls toward 0 instead), while the KL to the start stays a few nats."""
    torch.manual_seed(0)
    recipe = _recipe(tmp_path, tiny_base(tmp_path, tokenizer_dir), steps=120)
    result = ppo(recipe, show_progress=False, reward=first_half_letters)
    rows = _rollouts(tmp_path / "ppo")
    assert result["rollouts"] == 30 and [r["rollout"] for r in rows] == list(range(1, 31))
    assert rows[0]["kl"] == 0.0  # the first rollout's policy is the reference
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.15, (first, last)
    assert all(0 <= r["kl"] < 5 for r in rows[-5:]), [r["kl"] for r in rows]
    assert rows[-1]["entropy"] < rows[0]["entropy"]
    for key in ("gold", "kl_coef", "clip_fraction", "value_loss", "policy_loss", "explained_variance",
                "response_length", "approx_kl"):
        assert key in rows[-1]
    # The saved model is the policy alone, a plain language model.
    assert type(load_pretrained(tmp_path / "ppo")) is LlamaModel


def test_lora_reference_is_the_base_and_a_reward_model_scores(tmp_path: Path, tokenizer_dir: Path) -> None:
    """With LoRA the reference is the base with the adapters off: the first rollout's KL is exactly 0 and
    later ones are not; the reward is a reward model's score (`athanor rm`'s format)."""
    base = tiny_base(tmp_path, tokenizer_dir)
    rm_dir = tmp_path / "rm"
    torch.manual_seed(1)
    save_pretrained(RewardModel(tiny_model_config(pad_token_id=Tokenizer.load(tokenizer_dir).pad_id)), rm_dir)
    Tokenizer.load(tokenizer_dir).save(rm_dir)
    recipe = _recipe(tmp_path, base, steps=8, lora=True)
    recipe.reward = str(rm_dir)
    recipe.train.lr = 1e-2
    result = ppo(recipe, show_progress=False)
    rows = _rollouts(tmp_path / "ppo")
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0
    assert rows[0]["reward"] != 0.0 and "gold" in rows[0]
    assert result["trainable_parameters"] > 0 and (tmp_path / "ppo" / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((tmp_path / "ppo" / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and not adapter["modules_to_save"]


def test_a_run_resumed_mid_rollout_matches_one_run_straight(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Killed after step 6 (half way through the second rollout's minibatches) and resumed, the run logs
    the same rollouts and ends with the same weights as one that ran straight through."""
    base = tiny_base(tmp_path, tokenizer_dir)
    straight = _recipe(tmp_path / "a", base, steps=12, adaptive_kl=True, target_kl=0.01)
    ppo(straight, show_progress=False, reward=first_half_letters)
    resumed = _recipe(tmp_path / "b", base, steps=6, adaptive_kl=True, target_kl=0.01)
    resumed.train.ckpt_every = 6
    ppo(resumed, show_progress=False, reward=first_half_letters)
    resumed.train.max_steps = 12
    result = ppo(resumed, show_progress=False, reward=first_half_letters)
    assert result["resumed_from_step"] == 6
    a = _rollouts(tmp_path / "a" / "ppo")
    b = {r["step"]: r for r in _rollouts(tmp_path / "b" / "ppo")}  # also step 6, where the first part ended
    same = lambda r: {k: v for k, v in r.items() if k not in ("loss", "tok_per_s")}  # noqa: E731 (loss: a window mean)
    assert len(a) == 3 and all(same(r) == same(b[r["step"]]) for r in a)
    assert len({r["kl_coef"] for r in a}) > 1  # the controller moved: its state is resumed too
    for p, q in zip(load_pretrained(tmp_path / "a" / "ppo").parameters(),
                    load_pretrained(tmp_path / "b" / "ppo").parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_reward_models_are_one_line_errors(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    code = main(["ppo", "--base", str(base), "--reward", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a reward model directory" in err
    # A reward model whose tokenizer is not the policy's.
    other = tmp_path / "other_rm"
    tok = Tokenizer.train(["just a few words of text, again and again"] * 20, TokenizerConfig(vocab_size=300),
                          show_progress=False)
    save_pretrained(RewardModel(tiny_model_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id)), other)
    tok.save(other)
    with pytest.raises(AthanorError, match="tokenizer is not the policy's"):
        ppo(_with_reward(_recipe(tmp_path, base, 4), other), show_progress=False)
    # A language model is not a reward model.
    with pytest.raises(AthanorError, match="Classification head|SequenceClassification"):
        ppo(_with_reward(_recipe(tmp_path, base, 4), base), show_progress=False)
    # Rollouts that do not split into whole minibatches.
    with pytest.raises(AthanorError, match="rollout_batch"):
        ppo(_recipe(tmp_path, base, 4, rollout_batch=24), show_progress=False, reward=first_half_letters)


def _with_reward(recipe: PPORecipe, reward: Path) -> PPORecipe:
    recipe.reward = str(reward)
    return recipe


def test_the_shipped_recipe_loads_and_splits_into_whole_rollouts() -> None:
    from athanor.config import load_recipe
    from athanor.train.ppo import check_sizes

    recipe = load_recipe(PPORecipe, Path(__file__).parents[1] / "recipes" / "ppo.yaml", [])
    check_sizes(recipe.ppo, recipe.train)
    steps_per_rollout = recipe.ppo.ppo_epochs * recipe.ppo.rollout_batch // recipe.train.batch_size
    assert recipe.train.max_steps % steps_per_rollout == 0 and recipe.train.log_every == steps_per_rollout


def test_the_reward_model_scores_what_it_was_trained_on(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A reply is scored as `athanor rm` saw its pairs (prompt + answer + end of turn, train/rm.py's rows),
    and a batch scores each row as alone."""
    from athanor.data.preferences import encode_pair, load_pairs
    from athanor.rl.rewards import RewardModelScore

    tok = Tokenizer.load(tokenizer_dir)
    pair = load_pairs(toy_pairs_file(tmp_path / "p.jsonl", 1))[0]
    encoded = encode_pair(tok, pair)
    task = Task("t", "arithmetic", pair.prompt[0]["content"], "", "k")
    torch.manual_seed(0)
    score = RewardModelScore(RewardModel(tiny_model_config(pad_token_id=tok.pad_id)), tok, batch_size=2)
    replies = [pair.chosen[0]["content"], pair.rejected[0]["content"] + " and more"]
    assert score.rows([task], replies[:1]) == [encoded.prompt_ids + encoded.chosen_ids]
    together = score([task, task], replies)
    alone = [score([task], [r])[0] for r in replies]
    assert together == pytest.approx(alone, abs=1e-5)
