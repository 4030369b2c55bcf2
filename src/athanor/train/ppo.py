"""PPO on the one trainer loop (`athanor ppo`): RLHF as in InstructGPT, on prompts of verifiable tasks.

The arithmetic (KL-penalized token rewards, GAE, whitening, the clipped losses, the KL controller)
is rl/ppo.py's, whose docstring states the formulas: Ouyang et al. (2022) with the conventions
catalogued by Huang et al. (2022, "The N Implementation Details of RLHF with PPO"), which TRL's
PPOTrainer followed before TRL dropped it. This module is the stage that feeds it:

- Policy: the model being tuned (full weights or LoRA) with a value head on its trunk
  (train/policy_value.py says why shared). Reference: the starting model, frozen; with LoRA the
  same weights with the adapters switched off, so no second copy is held.
- Rollout (when the stage's buffer of minibatches is empty): `ppo.rollout_batch` task prompts,
  each one user turn rendered by the chat format, are answered by the current policy on the engine
  (`LocalLM`: batched, KV cache), sampled at `ppo.temperature` with a seed per (task, rollout).
  A response is the sampled tokens plus the stop token that ended it, if one did (emitting it is an
  action the policy learns); one that never closed its turn (`<|end|>`) loses `missing_eos_penalty`.
  Then one no-grad forward of the policy (log-probs, values, entropy) and of the reference
  (log-probs), both of logits / temperature as sampled; the reward (a reward model's score, or the
  verifier) of each reply; and, since the prompts are tasks, the verifier's gold reward beside a
  proxy one, so proxy and gold can be plotted against the KL (Gao et al. 2022).
- Update: `ppo.ppo_epochs` passes over the rollout, each shuffled into minibatches of
  `train.batch_size x train.grad_accum` rows, one optimizer step each. The loop's loss is the
  per-token policy loss + vf_coef x value loss summed over response tokens and divided by their
  count over the step's micro-batches: exactly the masked means of rl/ppo.py over the minibatch.
  The KL coefficient, when adaptive, moves after each rollout.

Metrics (metrics.jsonl, every logged step, the rollout ones those of the rollout the step learns
from): reward (mean proxy score), gold (verifier pass rate), kl (mean per-sequence KL to the
reference, k1 estimator summed over the response), kl_coef, entropy (mean per token), response_length,
eos_rate, explained_variance (of the rollout's values for its returns), and per step policy_loss,
value_loss, clip_fraction, value_clip_fraction, approx_kl. Held out (at eval_every and the end):
val_reward and val_gold of greedy replies to held-out tasks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from athanor.config import save_yaml
from athanor.data.sampler import EpochSampler
from athanor.data.synth import KINDS, Task, make_splits, read_tasks
from athanor.data.verifier_pairs import answer_seed
from athanor.errors import AthanorError
from athanor.lm.local import LocalLM
from athanor.model.hf import load_pretrained
from athanor.model.lora import adapters_disabled
from athanor.rl import ppo as rl
from athanor.rl.rewards import Reward, RewardModelScore, verifier_reward
from athanor.tokenizer import Tokenizer
from athanor.train import dist
from athanor.train.finetune import LoraSettings, maybe_apply_lora, save_run
from athanor.train.loop import TrainConfig, Trainer, autocast_dtype
from athanor.train.policy_value import PolicyWithValue
from athanor.train.rollout import Sampled, entropy_sum, minibatches, response_rows, sample_replies


@dataclass
class TaskDataConfig:
    """Prompts: synthetic tasks (data/synth.py), or task files from `athanor synth tasks`."""

    paths: list[str] = field(default_factory=list)  # task files (JSONL); empty: synthetic tasks
    heldout: str | None = None  # a held-out task file; None: the synthetic held-out split
    synth_train: int = 512
    synth_heldout: int = 32  # 0: no held-out evaluation
    synth_kinds: list[str] = field(default_factory=lambda: list(KINDS))
    seed: int = 0
    # Prompt only with these kinds (files or synthetic; None: all); the held-out set stays whole. A kind
    # the policy never solves gives groups whose rewards are all 0: no gradient, only generation cost.
    train_kinds: list[str] | None = None


@dataclass
class PPOConfig:
    """TRL's PPOConfig names and defaults where it had them."""

    rollout_batch: int = 32  # prompts answered per rollout (per rank)
    ppo_epochs: int = 4  # passes over each rollout (TRL num_ppo_epochs)
    max_new_tokens: int = 48  # TRL response_length 53
    temperature: float = 1.0  # sampling temperature; log-probs are taken of logits / temperature, as sampled
    kl_coef: float = 0.05  # the KL penalty's coefficient (its start, when adaptive)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False  # Ziegler et al.'s controller toward target_kl
    target_kl: float = 6.0  # nats per sequence
    kl_horizon: float = 10_000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None  # taken off the score of a reply that never closed its turn


def ppo_train_config() -> TrainConfig:
    """PPO's training defaults: a constant learning rate (the policy must move little per rollout), no
    weight decay, each logged line one rollout's last step (rollout_batch 32 / batch 8 x 4 epochs)."""
    return TrainConfig(max_steps=64, batch_size=8, lr=1e-5, schedule="constant", warmup_steps=0, eval_every=0,
                       eval_tokens=0, ckpt_every=16, log_every=16, weight_decay=0.0)


@dataclass
class PPORecipe:
    out_dir: str = "runs/ppo"
    base: str = "runs/speedrun/sft"  # run dir (or HF checkpoint) of the policy to tune, usually an SFT model
    reward: str = "runs/rm"  # a reward model's run dir (`athanor rm`), or "verifier": the tasks' gold reward
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=ppo_train_config)


def load_tasks(d: TaskDataConfig) -> tuple[list[Task], list[Task]]:
    """(rollout prompts, held-out tasks)."""
    if d.paths:
        train = [t for p in d.paths for t in read_tasks(p)]
        held = read_tasks(d.heldout) if d.heldout else []
    else:
        train, held, _ = make_splits(d.synth_train, d.synth_heldout, d.seed, d.synth_kinds)
        held = read_tasks(d.heldout) if d.heldout else held
    if d.train_kinds is not None:
        unknown = sorted(set(d.train_kinds) - set(KINDS))
        if unknown:
            raise AthanorError(f"unknown task kinds {unknown}; choose from {list(KINDS)}", field="data.train_kinds")
        train = [t for t in train if t.kind in d.train_kinds]
    if not train:
        raise AthanorError("no task to roll out", field="data.paths")
    return train, held


def check_sizes(cfg: PPOConfig, train: TrainConfig) -> None:
    """Each optimizer step is one whole minibatch of one rollout."""
    minibatch = train.batch_size * train.grad_accum
    if cfg.rollout_batch < 1 or cfg.rollout_batch % minibatch:
        raise AthanorError(f"must be a multiple of train.batch_size x train.grad_accum = {minibatch} (one "
                           f"optimizer step per minibatch), got {cfg.rollout_batch}", field="ppo.rollout_batch")
    if cfg.ppo_epochs < 1 or cfg.max_new_tokens < 1 or cfg.temperature <= 0:
        raise AthanorError("ppo_epochs and max_new_tokens must be >= 1 and temperature > 0", field="ppo")


class PPOStage:
    """Rolls out when its buffer is empty, then hands out the rollout's micro-batches, `ppo_epochs` times."""

    def __init__(self, policy: PolicyWithValue, reference: PolicyWithValue | None, tok: Tokenizer,
                 tasks: list[Task], heldout: list[Task], reward: Reward, gold: Reward | None, cfg: PPOConfig,
                 train: TrainConfig, device: torch.device, rank: int = 0, world: int = 1) -> None:
        """`reference` None: the policy with its LoRA adapters off. `gold` None: no gold reward logged."""
        check_sizes(cfg, train)
        self.policy, self.reference, self.tok = policy, reference, tok
        self.tasks, self.heldout, self.reward, self.gold, self.cfg = tasks, heldout, reward, gold, cfg
        self.batch_size, self.seed, self.device = train.batch_size, train.seed, device
        self.amp_dtype = autocast_dtype(train, device)
        self.sampler = EpochSampler(len(tasks), cfg.rollout_batch, train.seed, rank, world, what="tasks")
        self.lm = LocalLM(policy, tok, max_batch=cfg.rollout_batch)
        self.kl = rl.AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.history: list[dict[str, float]] = []  # each rollout's statistics

    # -- rollouts --------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def _sample(self, tasks: list[Task], temperature: float, rollout: int) -> Sampled:
        return sample_replies(self.lm, self.tok, tasks, self.cfg.max_new_tokens, temperature,
                              [answer_seed(self.seed, t.id, rollout) for t in tasks], field="ppo.max_new_tokens")

    @torch.no_grad()
    def rollout(self) -> dict[str, float]:
        """Sample, score and turn one batch of prompts into `ppo_epochs` shuffled passes of micro-batches."""
        cfg, n = self.cfg, len(self.history)
        tasks = [self.tasks[i] for i in self.sampler.next_indices().tolist()]
        sampled = self._sample(tasks, cfg.temperature, n)
        has_eos, replies = sampled.closed, sampled.replies
        scores = torch.tensor(self.reward(tasks, replies), dtype=torch.float32)
        gold = None if self.gold is None else \
            scores if self.gold is self.reward else torch.tensor(self.gold(tasks, replies), dtype=torch.float32)
        x, y = response_rows(sampled.prompts, sampled.responses, self.tok.pad_id)
        mask = (y != -100).float()
        logp, values, ref_logp, entropy = self._forward(x, y, mask)
        kl = rl.kl_estimate(logp, ref_logp, cfg.kl_estimator) * mask
        rewards = rl.token_rewards(scores, kl, mask, self.kl.value, has_eos, cfg.missing_eos_penalty)
        if cfg.whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False)
        advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = rl.whiten(advantages, mask)
        seq_kl = float(kl.sum(1).mean())
        stats = {"rollout": n + 1, "reward": float(scores.mean()), "kl": seq_kl, "kl_coef": self.kl.value,
                 "entropy": entropy, "response_length": float(mask.sum(1).mean()),
                 "eos_rate": float(has_eos.float().mean()),
                 "explained_variance": float(rl.explained_variance(values, returns, mask))}
        if gold is not None:
            stats["gold"] = float(gold.mean())
        if cfg.adaptive_kl:
            self.kl.update(seq_kl, len(x))
        data = {"x": x, "y": y, "mask": mask, "old_logp": logp, "old_values": values, "advantages": advantages,
                "returns": returns}
        g = torch.Generator().manual_seed(answer_seed(self.seed, "minibatches", n))
        self.buffer += minibatches(data, mask, cfg.ppo_epochs, self.batch_size, g)
        self.history.append(stats)
        return stats

    def _forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(log-probs, values, reference log-probs) as (B, T) on the CPU, and the policy's mean entropy."""
        temp, parts, entropy = self.cfg.temperature, [], 0.0
        for i in range(0, x.shape[0], self.batch_size):
            xs, ys = x[i:i + self.batch_size].to(self.device), y[i:i + self.batch_size].to(self.device)
            with self._autocast():
                hidden = self.policy.hidden_states(xs)
                logp, values = self.policy.heads(hidden, ys, temp)
                entropy += float(entropy_sum(self.policy.lm_head, hidden, ys != -100, temp))
                with adapters_disabled(self.policy) if self.reference is None else contextlib.nullcontext():
                    ref_logp = (self.reference or self.policy)(xs, targets=ys, values=True, temperature=temp)[0]
            parts.append([t.float().cpu() for t in (logp, values, ref_logp)])
        logp, values, ref_logp = (torch.cat(p) * mask for p in zip(*parts, strict=True))
        return logp, values, ref_logp, entropy / float(mask.sum())

    # -- the loop's protocol -------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.buffer:
            self.rollout()
        return self.buffer.pop(0)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp, values = model(batch["x"], targets=batch["y"], values=True, temperature=self.cfg.temperature)
        s = rl.ppo_losses(logp, batch["old_logp"], batch["advantages"], values, batch["old_values"],
                          batch["returns"], batch["mask"], self.cfg.cliprange, self.cfg.cliprange_value)
        loss = (s.policy_loss + self.cfg.vf_coef * s.value_loss) * batch["mask"].sum()
        return loss, {**self.history[-1], "policy_loss": float(s.policy_loss.detach()),
                      "value_loss": float(s.value_loss.detach()),
                      "clip_fraction": float(s.clip_fraction), "value_clip_fraction": float(s.value_clip_fraction),
                      "approx_kl": float(s.approx_kl)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy replies to the held-out tasks: their mean reward and gold pass rate."""
        if not self.heldout:
            return {}
        replies = self._sample(self.heldout, 0.0, 0).replies
        result = {"val_reward": sum(self.reward(self.heldout, replies)) / len(replies)}
        if self.gold is not None:
            result["val_gold"] = sum(self.gold(self.heldout, replies)) / len(replies)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "kl_coef": self.kl.value, "buffer": self.buffer,
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.kl.value, self.buffer, self.history = state["kl_coef"], state["buffer"], state["history"]


def ppo(recipe: PPORecipe, show_progress: bool = True, reward: Reward | None = None) -> dict[str, Any]:
    """Tune `recipe.base` with PPO into `recipe.out_dir`; returns (and writes to eval.json) the first and
    last rollouts' statistics and the held-out evaluation. `reward`: a Python reward in place of
    `recipe.reward` (experiments, tests)."""
    out_dir = Path(recipe.out_dir)
    info = dist.setup(recipe.train.device)
    try:
        tok = Tokenizer.load(recipe.base)
        lm = load_pretrained(recipe.base, device=info.device)
        tasks, heldout = load_tasks(recipe.data)
        reward_name = recipe.reward if reward is None else "custom"
        if reward is None:
            reward = verifier_reward if recipe.reward == "verifier" else \
                RewardModelScore.load(recipe.reward, tok, info.device, recipe.train.batch_size)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(recipe, out_dir / "athanor.yaml")
        reference = None
        if not recipe.lora.enabled:  # with LoRA the reference is the policy with its adapters off
            reference = PolicyWithValue.from_language_model(copy.deepcopy(lm)).eval().requires_grad_(False)
        policy = PolicyWithValue.from_language_model(lm)
        lora_info = maybe_apply_lora(policy, recipe.lora, recipe.train.seed, modules_to_save=("v_head",))
        stage = PPOStage(policy, reference, tok, tasks, heldout, reward, verifier_reward, recipe.ppo, recipe.train,
                         info.device, info.rank, info.world)
        trainer = Trainer(policy, stage, recipe.train, out_dir, info, show_progress, name="ppo")
        heldout_eval = trainer.fit() or (trainer.evaluate() if heldout else {})
        result: dict[str, Any] = {"reward": reward_name,
                                  "steps": recipe.train.max_steps, "rollouts": len(stage.history),
                                  "resumed_from_step": trainer.resumed_from,
                                  "first_rollout": stage.history[0] if stage.history else None,
                                  "last_rollout": stage.history[-1] if stage.history else None, **heldout_eval}
        # The adapter saved is the policy's alone: the value head is a training device, dropped from the model.
        saved = dataclasses.replace(lora_info, modules_to_save=[]) if lora_info is not None else None
        save_run(trainer, recipe.base, saved, out_dir, tok, info, result, PolicyWithValue.from_language_model,
                 lambda m: m.language_model())
        return result
    finally:
        dist.teardown()
