"""GRPO on the trainer loop (train/grpo.py): a toy reward with a known best answer is learned, every
completion lands in the rollout log the audit reads, the LoRA reference is the base, a run resumes
exactly, the reward functions score what they say, and bad settings are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_base

from athanor.cli import main
from athanor.data.synth import Task
from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained
from athanor.rl.audit import audit_log
from athanor.rl.grpo import GRPOLossConfig
from athanor.rl.rewards import REWARD_FUNCTIONS, Replies
from athanor.train.finetune import LoraSettings
from athanor.train.grpo import GRPOConfig, GRPORecipe, grpo
from athanor.train.loop import TrainConfig
from athanor.train.ppo import TaskDataConfig

FIRST_HALF = set("abcdefghijklm")


def first_half_letters(r: Replies) -> list[float | None]:
    """The share of a reply's characters that are letters a-m: best answer, a reply of only those."""
    return [sum(c in FIRST_HALF for c in text) / max(len(text), 1) for text in r.texts]


TOY = {"letters": first_half_letters}


def _recipe(tmp_path: Path, base: Path, steps: int, lora: bool = False, loss: dict | None = None,
            **grpo_kw) -> GRPORecipe:
    """8 prompts x 4 answers of 4 new tokens per batch, micro-batches of 16: 2 steps a batch."""
    cfg = dict(prompts_per_step=8, num_generations=4, reward_funcs=["letters"],
               loss=GRPOLossConfig(**{"max_completion_length": 4, **(loss or {})}))
    cfg.update(grpo_kw)
    return GRPORecipe(out_dir=str(tmp_path / "grpo"), base=str(base),
                      data=TaskDataConfig(synth_train=64, synth_heldout=0, synth_kinds=["arithmetic"]),
                      grpo=GRPOConfig(**cfg), lora=LoraSettings(enabled=lora),
                      train=TrainConfig(max_steps=steps, batch_size=16, lr=1e-3, schedule="constant", warmup_steps=0,
                                        eval_every=0, eval_tokens=0, ckpt_every=0, log_every=2, weight_decay=0.0))


def _rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "rollout" in r]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]


def test_grpo_raises_a_known_reward_and_logs_every_completion(tmp_path: Path, tokenizer_dir: Path) -> None:
    """50 batches on a random tiny model: the share of a-m letters climbs well past where it started (with
    the advantages' sign flipped it would fall); every completion is in rollouts.jsonl with its reward and
    advantage, and the audit reads that log."""
    recipe = _recipe(tmp_path, tiny_base(tmp_path, tokenizer_dir), steps=100, num_iterations=1)
    result = grpo(recipe, show_progress=False, rewards=TOY)
    rows = _rows(tmp_path / "grpo")
    assert result["rollouts"] == 50 and [r["rollout"] for r in rows] == list(range(1, 51))
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.15, (first, last)
    for key in ("rewards/letters/mean", "rewards/letters/std", "reward_std", "frac_reward_zero_std", "entropy",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean",
                "clip_ratio/high_max"):
        assert key in rows[-1], key
    assert "kl" not in rows[-1]  # beta 0: no reference, no KL
    log = _log(tmp_path / "grpo")
    assert len(log) == 50 * 32 and {r["rollout"] for r in log} == set(range(1, 51))
    # A group's advantages are its rewards against the group's mean (GRPO: over the group's std).
    group = [r for r in log if r["rollout"] == 1][:4]
    assert len({r["task_id"] for r in group}) == 1
    rewards = torch.tensor([r["reward"] for r in group])
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    assert [r["advantage"] for r in group] == pytest.approx(expected.tolist(), abs=1e-5)
    report = audit_log(tmp_path / "grpo")
    assert report["completions"] == len(log)


def test_lora_with_a_kl_uses_the_base_as_reference(tmp_path: Path, tokenizer_dir: Path) -> None:
    """With LoRA and beta > 0 the reference is the base with the adapters off: the first batch's KL is
    exactly 0 (the adapters start at zero) and a later one's is not; the adapter is what is saved."""
    recipe = _recipe(tmp_path, tiny_base(tmp_path, tokenizer_dir), steps=6, lora=True, loss={"beta": 0.1})
    recipe.train.lr = 1e-2
    result = grpo(recipe, show_progress=False, rewards=TOY)
    rows = _rows(tmp_path / "grpo")
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.0
    assert result["trainable_parameters"] > 0 and (tmp_path / "grpo" / "adapter" / "adapter_config.json").is_file()


def test_a_run_resumed_mid_batch_matches_one_run_straight(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Killed after step 3 (half way through the second batch's micro-batches, two passes over each batch)
    and resumed, the run logs the same metrics and completions and ends with the same weights."""
    base = tiny_base(tmp_path, tokenizer_dir)
    straight = _recipe(tmp_path / "a", base, steps=8, num_iterations=2, advantage="rloo", loss={"loss_type": "grpo"})
    grpo(straight, show_progress=False, rewards=TOY)
    resumed = _recipe(tmp_path / "b", base, steps=3, num_iterations=2, advantage="rloo", loss={"loss_type": "grpo"})
    resumed.train.ckpt_every = 3
    resumed.train.log_every = 1
    grpo(resumed, show_progress=False, rewards=TOY)
    # The killed run had already sampled its next batch: a log line the resumed run must not keep twice.
    resumed.train.max_steps = 8
    resumed.train.log_every = 2
    result = grpo(resumed, show_progress=False, rewards=TOY)
    assert result["resumed_from_step"] == 3
    a, b = _rows(tmp_path / "a" / "grpo"), {r["step"]: r for r in _rows(tmp_path / "b" / "grpo")}
    same = lambda r: {k: v for k, v in r.items() if k not in ("loss", "tok_per_s")}  # noqa: E731 (loss: a window mean)
    assert len(a) == 4 and all(same(r) == same(b[r["step"]]) for r in a)
    assert _log(tmp_path / "a" / "grpo") == _log(tmp_path / "b" / "grpo")
    for p, q in zip(load_pretrained(tmp_path / "a" / "grpo").parameters(),
                    load_pretrained(tmp_path / "b" / "grpo").parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_reward_functions_score_what_they_say() -> None:
    py = Task("p", "python", "Write a Python function `f(x)` that returns x plus 1.", "def f(x):\n    return x + 1",
              "k", "assert f(1) == 2")
    ar = Task("a", "arithmetic", "Compute 2 + 2.", "4", "k2")
    r = Replies([py, py, py, ar, ar], ["```python\ndef f(x):\n    return x + 1\n```", "def f(x) return", "def f(x):\n"
                "    return x + 1", "4", "5"], lengths=[20, 6, 30, 2, 32], closed=[True, True, False, True, True],
                max_tokens=32, overlong_buffer=8)
    assert REWARD_FUNCTIONS["verifier"](r) == [1.0, 0.0, 1.0, 1.0, 0.0]
    # Closed its turn, and (Python) holds code that parses: the third never closed its turn.
    assert REWARD_FUNCTIONS["format"](r) == [1.0, 0.0, 0.0, 1.0, 1.0]
    # 0 up to 32 - 8 = 24 tokens, then down to -1 at 32.
    assert REWARD_FUNCTIONS["overlong"](r) == [0.0, 0.0, pytest.approx(-0.75), 0.0, -1.0]


def test_bad_settings_are_one_line_errors(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    for override, words in [("--grpo.num_generations=1", "at least 2"),
                            ("--grpo.reward_funcs=verifier,nonsense", "unknown reward function"),
                            ("--grpo.prompts_per_step=3", "multiple of train.batch_size"),
                            ("--grpo.reward_weights=1,2", "2 weights for 1 reward functions"),
                            ("--grpo.advantage=rloo --grpo.scale=group", "scale")]:
        code = main(["grpo", "--base", str(base), "--out", str(tmp_path / "o"), "--quiet", *override.split()])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and words in err, (override, err)
    with pytest.raises(AthanorError, match="new tokens leave"):
        grpo(_recipe(tmp_path, base, 2, loss={"max_completion_length": 500}), show_progress=False, rewards=TOY)
