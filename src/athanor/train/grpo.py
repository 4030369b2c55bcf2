"""GRPO on the one trainer loop (`athanor grpo`): RL on verifiable rewards (RLVR) without a value model.

The arithmetic (group advantages, the clipped per-token loss, the k3 KL, the four loss aggregations)
is rl/grpo.py's, whose docstring states the formulas and where each variant comes from. This module
is the stage that feeds it, following TRL 1.16's GRPOTrainer where it had a choice:

- Generation (when the stage's buffer is empty): `grpo.prompts_per_step` task prompts, each one
  user turn, are each answered `grpo.num_generations` (G) times by the current policy on the engine
  (`LocalLM`: all G x prompts decoded in one continuous batch with a KV cache, on the weights being
  trained, nothing re-loaded), at `grpo.temperature`, with a seed per (task, answer).
- Multi-turn with tools (`grpo.environment`, default "single": one reply): with "python_tool" a reply
  may run code (a ```run block) in the sandbox and read its output in the next turn, up to
  `grpo.max_turns` replies, each turn one batched generate over the rollouts still going
  (train/rollout.py `sample_episodes`, rl/environment.py). The final reply is what the reward functions
  score; the loss learns every token the policy sampled in any turn and none of the tool turns'
  (their targets are -100), and `loss.max_completion_length` bounds a rollout's sampled tokens together.
- Rewards: the named functions of `grpo.reward_funcs` (rl/rewards.py REWARD_FUNCTIONS: the verifier,
  which grades Python answers by unit tests in the sandbox; format; DAPO's overlong penalty) weighted
  by `grpo.reward_weights`; a weight of 0 logs a function without rewarding it.
- Advantages per group (GRPO, Dr. GRPO or RLOO), one per completion, spread over its tokens.
- One no-grad forward gives the sampling policy's log-probs (the ratio's denominator, needed once the
  weights move within a generation: more than one optimizer step per batch, or `num_iterations` > 1),
  the reference's (when beta > 0; with LoRA the policy with its adapters off, so no second copy is
  held) and the entropy.
- Update: `num_iterations` passes over the generation batch, each shuffled into micro-batches of
  `train.batch_size` rows; an optimizer step takes `train.grad_accum` of them. The loop divides the
  summed losses of a step by the summed `loss_tokens`: for "dapo" the token sum over the token count
  of the whole step (all ranks), its token-level loss exactly; for the other types each micro-batch's
  own loss (`grpo_loss`), averaged over the step's micro-batches, as TRL does with accumulation.

Every completion goes to `rollouts.jsonl` in the run directory (rank 0's), in the rollout log format
`athanor audit` reads (rl/audit.py), so a run can be audited for reward hacking while or after it
trains. Metrics (TRL's names): reward, reward_std, rewards/<function>/mean|std, frac_reward_zero_std
(groups whose answers all scored alike: they teach nothing), completions/* lengths, entropy, kl,
clip_ratio/*; held out (every train.eval_every steps and at the end): pass@1 of greedy answers (one
reply, without tools, whatever `grpo.environment`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from athanor.config import save_yaml
from athanor.data.sampler import EpochSampler
from athanor.data.synth import Task
from athanor.data.verifier_pairs import answer_seed
from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.lm.local import LocalLM
from athanor.model.hf import load_pretrained
from athanor.model.linear_ce import linear_token_logprobs
from athanor.model.llama import LlamaModel
from athanor.model.lora import adapters_disabled
from athanor.report import plot_rl_curves
from athanor.rl import grpo as rl
from athanor.rl.environment import ENVIRONMENTS, EnvironmentName, make_environment
from athanor.rl.rewards import REWARD_FUNCTIONS, Replies, RewardFunction
from athanor.stats import mean_interval
from athanor.tokenizer import Tokenizer
from athanor.train import dist
from athanor.train.behavior import evaluate_behavior, sampled_pass_rates
from athanor.train.finetune import LoraSettings, maybe_apply_lora, save_run
from athanor.train.loop import Checkpoints, TrainConfig, Trainer, autocast_dtype
from athanor.train.ppo import TaskDataConfig, load_tasks
from athanor.train.rollout import Sampled, entropy_sum, minibatches, response_rows, sample_episodes, sample_replies

ROLLOUT_LOG = "rollouts.jsonl"
CURVES = "rl_curves.png"  # reward, held-out pass@1, entropy/KL, lengths over steps


def _grpo_loss_defaults() -> rl.GRPOLossConfig:
    return rl.GRPOLossConfig(max_completion_length=64)


@dataclass
class GRPOConfig:
    """TRL's GRPOConfig names and defaults where it has them. The completion length limit is
    `loss.max_completion_length` (one setting in TRL too: it bounds generation and is Dr. GRPO's constant)."""

    prompts_per_step: int = 16  # distinct prompts per generation batch (per rank)
    num_generations: int = 8  # G: answers per prompt
    num_iterations: int = 1  # passes over each generation batch (TRL's mu)
    temperature: float = 1.0  # sampling temperature; log-probs are of logits / temperature, as sampled
    advantage: rl.AdvantageKind = "grpo"  # grpo | dr_grpo | rloo
    scale: rl.Scale | None = None  # None: the advantage kind's default (rl/grpo.py SCALES)
    mask_truncated_completions: bool = False  # DAPO's overlong filtering
    reward_funcs: list[str] = field(default_factory=lambda: ["verifier"])
    reward_weights: list[float] | None = None  # one per function; None: all 1
    overlong_buffer: int = 16  # tokens before the limit over which the `overlong` reward falls to -1
    eval_samples: int = 0  # held-out pass@1 before/after also from this many samples per task (0: greedy only)
    eval_temperature: float = 1.0
    # single: one reply per prompt. python_tool: a reply holding a ```run block has its code run in the
    # sandbox, whose output comes back as the next turn (masked from the loss), until a reply without one
    # (the final answer, which the reward functions score) or max_turns replies (rl/environment.py).
    environment: EnvironmentName = "single"
    max_turns: int = 4  # most policy replies in a multi-turn rollout (tool calls + the final answer)
    loss: rl.GRPOLossConfig = field(default_factory=_grpo_loss_defaults)


def grpo_train_config() -> TrainConfig:
    """GRPO's training defaults: a small constant learning rate, no weight decay (TRL: lr 1e-6 for
    billion-parameter models; the speedrun's small model moves at 1e-5..1e-4)."""
    return TrainConfig(max_steps=64, batch_size=32, lr=2e-5, schedule="constant", warmup_steps=0, eval_every=0,
                       eval_tokens=0, ckpt_every=8, log_every=4, weight_decay=0.0)


@dataclass
class GRPORecipe:
    out_dir: str = "runs/grpo"
    base: str = "runs/speedrun/sft"  # run dir (or HF checkpoint) of the policy to tune, usually an SFT model
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=grpo_train_config)


def check_config(cfg: GRPOConfig, train: TrainConfig, known: dict[str, RewardFunction] = REWARD_FUNCTIONS) -> None:
    """Each optimizer step takes whole micro-batches of one generation batch; every reward function is `known`."""
    rows, minibatch = cfg.prompts_per_step * cfg.num_generations, train.batch_size * train.grad_accum
    if cfg.num_generations < 2:
        raise AthanorError(f"must be at least 2 (a group's advantages compare its answers), got "
                           f"{cfg.num_generations}", field="grpo.num_generations")
    if cfg.prompts_per_step < 1 or rows % minibatch:
        raise AthanorError(f"prompts_per_step x num_generations = {rows} must be a multiple of train.batch_size x "
                           f"train.grad_accum = {minibatch} (one optimizer step per minibatch)",
                           field="grpo.prompts_per_step")
    if cfg.num_iterations < 1 or cfg.temperature <= 0 or cfg.eval_samples < 0:
        raise AthanorError("num_iterations must be >= 1, temperature > 0, eval_samples >= 0", field="grpo")
    if cfg.environment not in ENVIRONMENTS or cfg.max_turns < 1:
        raise AthanorError(f"environment must be one of {', '.join(ENVIRONMENTS)} (got {cfg.environment!r}) and "
                           f"max_turns >= 1 (got {cfg.max_turns})", field="grpo.environment")
    unknown = [f for f in cfg.reward_funcs if f not in known]
    if unknown or not cfg.reward_funcs:
        raise AthanorError(f"unknown reward function(s) {unknown} (known: {', '.join(known)})",
                           field="grpo.reward_funcs")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.reward_funcs):
        raise AthanorError(f"{len(cfg.reward_weights)} weights for {len(cfg.reward_funcs)} reward functions",
                           field="grpo.reward_weights")
    kind_scales = rl.SCALES.get(cfg.advantage)
    if kind_scales is None or (cfg.scale is not None and cfg.scale not in kind_scales):
        raise AthanorError(f"advantage {cfg.advantage!r} with scale {cfg.scale!r}: known kinds and their scales "
                           f"are {rl.SCALES}", field="grpo.advantage")


class GRPOStage:
    """Generates when its buffer is empty, then hands out the batch's micro-batches, `num_iterations` times."""

    def __init__(self, policy: LlamaModel, reference: LlamaModel | None, tok: Tokenizer, tasks: list[Task],
                 heldout: list[Task], cfg: GRPOConfig, train: TrainConfig, device: torch.device,
                 rank: int = 0, world: int = 1, log_path: Path | None = None,
                 functions: dict[str, RewardFunction] = REWARD_FUNCTIONS) -> None:
        """`reference` None: the policy with its LoRA adapters off (only used when beta > 0).
        `log_path`: where completions are appended (None: not logged). `functions`: the reward functions
        `cfg.reward_funcs` names."""
        check_config(cfg, train, functions)
        self.functions = [functions[f] for f in cfg.reward_funcs]
        self.policy, self.reference, self.tok, self.tasks, self.heldout = policy, reference, tok, tasks, heldout
        self.cfg, self.batch_size, self.seed, self.device = cfg, train.batch_size, train.seed, device
        self.amp_dtype = autocast_dtype(train, device)
        self.rows = cfg.prompts_per_step * cfg.num_generations
        # The weights move within a batch when it spans several optimizer steps: the ratio then needs
        # the sampling policy's log-probs. With one step (and one pass) the first update's ratio is 1.
        self.steps_per_batch = cfg.num_iterations * self.rows // (train.batch_size * train.grad_accum)
        self.sampler = EpochSampler(len(tasks), cfg.prompts_per_step, train.seed, rank, world, what="tasks")
        self.lm = LocalLM(policy, tok, max_batch=self.rows)
        self.environment = make_environment(cfg.environment)
        self.weights = torch.tensor(cfg.reward_weights or [1.0] * len(cfg.reward_funcs))
        self.log_path = log_path
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.history: list[dict[str, float]] = []  # each generation batch's statistics

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    @torch.no_grad()
    def rollout(self) -> dict[str, float]:
        """Sample G answers to each of a batch of prompts, score them, and queue the batch's micro-batches."""
        cfg, n, G = self.cfg, len(self.history), self.cfg.num_generations
        prompts = [self.tasks[i] for i in self.sampler.next_indices().tolist()]
        tasks = [t for t in prompts for _ in range(G)]  # a group's answers side by side
        seeds = [answer_seed(self.seed, t.id, n * G + j) for t in prompts for j in range(G)]
        limit = cfg.loss.max_completion_length
        where = "grpo.loss.max_completion_length"
        if self.environment is None:
            sampled = sample_replies(self.lm, self.tok, tasks, limit, cfg.temperature, seeds, field=where)
        else:
            sampled = sample_episodes(self.lm, self.tok, tasks, self.environment, cfg.max_turns, limit,
                                      cfg.temperature, seeds, field=where)
        lengths = torch.tensor(sampled.lengths)
        replies = Replies(tasks, sampled.replies, lengths.tolist(), sampled.closed.tolist(), limit,
                          cfg.overlong_buffer)
        scores = torch.tensor([[math.nan if s is None else s for s in f(replies)] for f in self.functions],
                              dtype=torch.float32).T  # (B, F)
        rewards = rl.weighted_rewards(scores, self.weights)
        adv = rl.group_advantages(rewards, G, cfg.advantage, cfg.scale)
        x, y = response_rows(sampled.prompts, sampled.responses, self.tok.pad_id, sampled.masks)
        mask = (y != -100).float()
        if cfg.mask_truncated_completions:
            mask = rl.mask_truncated(mask, ~sampled.truncated)
        old_logp, ref_logp, entropy = self._forward(x, y, mask)
        stats: dict[str, float] = {"rollout": n + 1, **rl.reward_metrics(scores, cfg.reward_funcs, self.weights),
                                   "frac_reward_zero_std": float(adv.zero_std_fraction), "entropy": entropy,
                                   **rl.completion_length_metrics(lengths, sampled.truncated)}
        if ref_logp is not None:
            stats["kl"] = float(rl.masked_mean(rl.k3_kl(old_logp, ref_logp), mask))
        data = {"x": x, "y": y, "mask": mask, "advantages": adv.advantages}
        if self.steps_per_batch > 1:
            data["old_logp"] = old_logp
        if ref_logp is not None:
            data["ref_logp"] = ref_logp
        g = torch.Generator().manual_seed(answer_seed(self.seed, "minibatches", n))
        self.buffer += minibatches(data, mask, cfg.num_iterations, self.batch_size, g)
        self.history.append(stats)
        self._log(n + 1, tasks, sampled, scores, rewards, adv.advantages)
        return stats

    def _forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """The sampling policy's log-probs (B, T) on the CPU, or None when nothing reads them (one
        optimizer step per batch and no KL: the first update's ratio is 1 by construction); the
        reference's, or None when beta is 0; and the policy's mean entropy per completion token. One
        pass of the policy's layers serves its entropy and its log-probs."""
        temp, parts, refs, entropy = self.cfg.temperature, [], [], 0.0
        need_ref = self.cfg.loss.beta != 0
        need_logp = self.steps_per_batch > 1 or need_ref
        was_training = self.policy.training
        self.policy.eval()
        for i in range(0, x.shape[0], self.batch_size):
            xs, ys = x[i:i + self.batch_size].to(self.device), y[i:i + self.batch_size].to(self.device)
            with self._autocast():
                hidden = self.policy.hidden_states(xs)
                entropy += float(entropy_sum(self.policy.lm_head, hidden, ys != -100, temp))
                if need_logp:
                    # logits / T = (h / T) W^T, as the model's own forward scores them
                    logp = linear_token_logprobs((hidden / temp).flatten(0, 1), self.policy.lm_head.weight,
                                                 ys.flatten())
                    parts.append(logp.view(ys.shape).float().cpu())
                if need_ref:
                    with adapters_disabled(self.policy) if self.reference is None else contextlib.nullcontext():
                        ref = (self.reference or self.policy)(xs, targets=ys, token_logprobs=True, temperature=temp)
                    refs.append(ref.float().cpu())
        self.policy.train(was_training)
        valid = (y != -100).float()
        logp = torch.cat(parts) * valid if need_logp else None
        return logp, (torch.cat(refs) * valid if need_ref else None), entropy / max(float(mask.sum()), 1.0)

    def _log(self, rollout: int, tasks: list[Task], sampled: Sampled, scores: torch.Tensor, rewards: torch.Tensor,
             advantages: torch.Tensor) -> None:
        """Append the batch's completions to the rollout log (rl/audit.py's format, plus the rewards). The
        completion is the final reply, what was scored; a multi-turn rollout's whole conversation (prompt,
        replies, tool turns) is under "transcript"."""
        if self.log_path is None:
            return
        names = self.cfg.reward_funcs
        with self.log_path.open("w" if rollout == 1 else "a") as f:  # a fresh run starts a fresh log
            for i, (t, reply) in enumerate(zip(tasks, sampled.replies, strict=True)):
                record: dict[str, Any] = {"rollout": rollout, "task_id": t.id, "prompt": t.prompt,
                                          "completion": reply, "reward": _num(rewards[i]),
                                          "advantage": float(advantages[i]),
                                          "rewards": {f: _num(scores[i, j]) for j, f in enumerate(names)}}
                if "verifier" in names:  # graded on every test, none of which the policy saw
                    record["hidden_passed"] = bool(scores[i, names.index("verifier")] == 1)
                if sampled.transcripts is not None:
                    record["transcript"] = sampled.transcripts[i]
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """Keep only the rollouts the restored state holds (a killed run may have logged later ones)."""
        if self.log_path is None or not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["rollout"] <= len(self.history)]
        atomic_write_text(self.log_path, "".join(kept))

    # -- the loop's protocol -------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.buffer:
            self.rollout()
        return self.buffer.pop(0)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        # "dapo" is a token sum over the step's token count; the others are means of their micro-batch.
        return int(batch["mask"].sum()) if self.cfg.loss.loss_type == "dapo" else 1

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp = model(batch["x"], targets=batch["y"], token_logprobs=True, temperature=self.cfg.temperature)
        dapo = self.cfg.loss.loss_type == "dapo"
        loss, metrics = rl.grpo_loss(logp, batch.get("old_logp"), batch.get("ref_logp"), batch["advantages"],
                                     batch["mask"], self.cfg.loss, num_items=1.0 if dapo else None)
        step_metrics = {k: float(v) for k, v in metrics.items() if k != "kl"}  # the rollout's kl is logged
        return loss, {**self.history[-1], **step_metrics}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy answers to the held-out tasks: pass@1 and the share that closed their turn."""
        if not self.heldout:
            return {}
        b = evaluate_behavior(self.policy, self.tok, self.heldout, self.cfg.loss.max_completion_length,
                              batch_size=self.rows)
        return {"val_pass@1": b["pass_rate"], "val_answer_rate": b["answer_rate"]}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "buffer": self.buffer, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.buffer, self.history = state["buffer"], state["history"]
        self._truncate_log()


def _num(x: torch.Tensor) -> float | None:
    return None if math.isnan(float(x)) else float(x)


def heldout_pass(model: LlamaModel, tok: Tokenizer, heldout: list[Task], cfg: GRPOConfig) -> dict[str, list[float]]:
    """Per held-out task: the greedy answer's pass (0/1) and, with eval_samples, the sampled pass@1."""
    limit = cfg.loss.max_completion_length
    result = {"greedy": [float(p) for p in evaluate_behavior(model, tok, heldout, limit)["passed"]]}
    if cfg.eval_samples:
        result["sampled"] = sampled_pass_rates(model, tok, heldout, cfg.eval_samples, cfg.eval_temperature, limit,
                                               seed=1)
    return result


def compare(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, Any]:
    """Pass@1 before and after, and the difference paired by task with its 95% interval (stats.py)."""
    out: dict[str, Any] = {}
    for how in before:
        b, a = before[how], after[how]
        entry = {"tasks": len(b), "before": sum(b) / len(b), "after": sum(a) / len(a)}
        if len(b) >= 2:
            diff, low, high = mean_interval([y - x for x, y in zip(b, a, strict=True)])
            entry.update(diff=diff, diff_low=low, diff_high=high)
        out[how] = entry
    return out


def grpo(recipe: GRPORecipe, show_progress: bool = True, rewards: dict[str, RewardFunction] | None = None
         ) -> dict[str, Any]:
    """Tune `recipe.base` with GRPO into `recipe.out_dir`; returns (and writes to eval.json) the first and
    last batches' statistics and held-out pass@1 before and after, paired by task. `rewards`: reward
    functions by name beside REWARD_FUNCTIONS' (experiments, tests), for `grpo.reward_funcs` to name."""
    out_dir = Path(recipe.out_dir)
    functions = {**REWARD_FUNCTIONS, **(rewards or {})}
    check_config(recipe.grpo, recipe.train, functions)
    info = dist.setup(recipe.train.device)
    try:
        tok = Tokenizer.load(recipe.base)
        policy = load_pretrained(recipe.base, device=info.device)
        tasks, heldout = load_tasks(recipe.data)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(recipe, out_dir / "athanor.yaml")
        before_path = out_dir / "heldout_before.json"
        before = None
        if heldout and info.is_main:  # measured once: a run that will resume reuses it
            if before_path.exists() and Checkpoints(out_dir, 0).paths():
                before = json.loads(before_path.read_text())
            else:
                before = heldout_pass(policy, tok, heldout, recipe.grpo)
                atomic_write_text(before_path, json.dumps(before))
        reference = None
        if recipe.grpo.loss.beta != 0 and not recipe.lora.enabled:
            reference = copy.deepcopy(policy).eval().requires_grad_(False)
        lora_info = maybe_apply_lora(policy, recipe.lora, recipe.train.seed)
        stage = GRPOStage(policy, reference, tok, tasks, heldout, recipe.grpo, recipe.train, info.device,
                          info.rank, info.world, out_dir / ROLLOUT_LOG if info.is_main else None, functions)
        trainer = Trainer(policy, stage, recipe.train, out_dir, info, show_progress, name="grpo")
        trainer.fit()
        result: dict[str, Any] = {"steps": recipe.train.max_steps, "rollouts": len(stage.history),
                                  "resumed_from_step": trainer.resumed_from,
                                  "first_rollout": stage.history[0] if stage.history else None,
                                  "last_rollout": stage.history[-1] if stage.history else None}
        if before is not None:
            result["heldout"] = compare(before, heldout_pass(policy, tok, heldout, recipe.grpo))
        save_run(trainer, recipe.base, lora_info, out_dir, tok, info, result)
        if info.is_main:
            plot_rl_curves(out_dir / "metrics.jsonl", out_dir / CURVES)
        return result
    finally:
        dist.teardown()
