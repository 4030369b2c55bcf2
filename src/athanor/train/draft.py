"""A draft model for speculative decoding, distilled from its target (DistillSpec, Zhou et al., 2023).

Speculative decoding gains in proportion to how many draft tokens in a row the target accepts, so
the draft should imitate the *target*, not the corpus. Trained on the corpus, a 0.9M draft of the
speedrun's 4.2M target agreed with its greedy choice 64% of the time, in short runs (1.6 tokens per
round at k=1). Trained for about the same time on the target's own greedy continuations of
training-split prompts (sequence-level knowledge distillation, Kim & Rush, 2016; DistillSpec's
teacher-generated data), a 0.72M one-layer draft agrees on 87-88% of held-out continuation tokens
after 300 steps on 1,024 continuations, on 90% after 500 steps on 2,048, and on 91% after 1,000
steps on 2,048 (the speedrun's setting: ~2 min on 2 cores), giving 3.2-3.5 tokens per target
forward at k=3, 3.75 and then 3.97 at k=4 on held-out prompts (BENCHMARKS.md).

The data: random windows of the training split (after BOS) as prompts, each continued greedily by
the target, all of them through the batched engine. The loss: cross-entropy on the continuation
tokens only, whose labels are the target's argmax at every position (the prompt is corpus text,
not the target's choice). Held-out: the same on continuations of held-out-split prompts, reported
as top-1 agreement with the target.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from athanor.data.sampler import EpochSampler
from athanor.data.shards import open_tokens
from athanor.model.llama import LlamaModel, ModelConfig
from athanor.serve.engine import Engine
from athanor.serve.sampling import SamplingParams
from athanor.stage import Context

IGNORE = -100


@dataclass
class DraftConfig:
    """How much teacher data to generate (how long to train on it is the `TrainConfig`'s max_steps)."""

    prompts: int = 2048  # training-split prompts the target continues
    min_prompt_tokens: int = 4
    max_prompt_tokens: int = 64
    new_tokens: int = 128  # greedy continuation per prompt
    held_out_prompts: int = 64  # held-out-split prompts for the agreement metric
    teacher_batch: int = 64  # concurrent streams while the target generates
    seed: int = 0


def draft_config(target: ModelConfig) -> ModelConfig:
    """One layer at half the target's width. On a CPU a draft step costs more than its share of
    parameters (per-operation overhead and the vocabulary-wide head do not shrink with it), so
    depth is what to cut: distilled alike, one layer of 128 agreed with the speedrun's target about
    as often as two (87.5% vs 88.1% of held-out tokens) at two thirds of the step time."""
    return ModelConfig(model_type=target.model_type, vocab_size=target.vocab_size,
                       hidden_size=max(64, target.hidden_size // 2),
                       intermediate_size=max(128, target.intermediate_size // 2), num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=target.max_position_embeddings, rope_theta=target.rope_theta,
                       bos_token_id=target.bos_token_id, eos_token_id=target.eos_token_id,
                       pad_token_id=target.pad_token_id)


def split_prompts(tokens: np.ndarray, n: int, head: list[int], min_len: int, max_len: int, seed: int
                  ) -> list[list[int]]:
    """`n` prompts: `head` (the BOS, for a model whose tokenizer adds one: `encode_prompt("")`), then a
    window of `min_len` to `max_len` tokens at a random place in `tokens`."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    starts = rng.integers(0, len(tokens) - max_len, n)
    return [[*head, *tokens[s:s + m].tolist()] for s, m in zip(starts, lengths, strict=True)]


def held_out_prompts(run_dir: str | Path, n: int, head: list[int], seed: int = 1, min_len: int = 8,
                     max_len: int = 64) -> list[list[int]]:
    """Prompts from the run's held-out split (`data/val.bin`): text neither the target nor a draft
    distilled here was trained on."""
    return split_prompts(open_tokens(Path(run_dir) / "data", "val"), n, head, min_len, max_len, seed)


def teacher_sequences(target: LlamaModel, prompts: list[list[int]], new_tokens: int, batch: int,
                      desc: str = "draft teacher", show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's greedy continuations as a padded batch: inputs (N, T) and labels (N, T), whose
    labels are the continuation tokens (IGNORE on the prompt and the padding)."""
    engine = Engine(target, max_batch=batch)
    reqs = [engine.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0)) for p in prompts]
    # Engine.generate's loop, with a bar: on 2 cores the speedrun's teacher data takes ~40 s.
    with tqdm(total=len(reqs), desc=desc, unit=" seq", disable=not show_progress, dynamic_ncols=True) as bar:
        while not all(r.done for r in reqs):
            engine.step()
            bar.update(sum(r.done for r in reqs) - bar.n)
    seqs = [(r.prompt_ids, r.output_ids) for r in reqs]
    T = max(len(p) + len(o) for p, o in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, (p, o) in enumerate(seqs):
        s = torch.tensor(p + o)
        x[i, :len(s) - 1] = s[:-1]
        y[i, len(p) - 1:len(s) - 1] = s[len(p):]
    return x, y


class DistillStage:
    """Shuffled batches of teacher sequences, sharded over ranks (resumable); loss on the continuations."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
                 batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.x, self.y = train
        self.held_out, self.batch_size = held_out, batch_size
        self.sampler = EpochSampler(len(self.x), batch_size, seed, rank, world, what="teacher sequences",
                                    fit_batch=True)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.sampler.next_indices())
        return self.x[idx], self.y[idx]

    def loss_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int((batch[1] != IGNORE).sum())

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return model(x, targets=y), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        nll = hits = n = 0.0
        for i in range(0, len(self.held_out[0]), self.batch_size):
            x, y = (t[i:i + self.batch_size].to(device) for t in self.held_out)
            logits = model(x)[y != IGNORE].float()
            labels = y[y != IGNORE]
            nll += float(F.cross_entropy(logits, labels, reduction="sum"))
            hits += float((logits.argmax(-1) == labels).sum())
            n += labels.numel()
        return {"val_loss": nll / n, "agreement": hits / n}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def distill_draft(target: LlamaModel, run_dir: str | Path, out_dir: str | Path, train_cfg: Any,
                  cfg: DraftConfig | None = None, model_config: ModelConfig | None = None,
                  show_progress: bool = True) -> dict[str, Any]:
    """Distill a draft for `target` (whose run directory `run_dir` has the token shards and the
    tokenizer) into `out_dir` (HF layout, with the tokenizer), training with `train_cfg` (a
    `TrainConfig`). Returns held-out agreement and loss, parameters, steps and timings."""
    from athanor.model.hf import save_pretrained
    from athanor.tokenizer import Tokenizer
    from athanor.train import dist
    from athanor.train.loop import Trainer

    cfg = cfg or DraftConfig()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    tok = Tokenizer.load(run_dir)
    t0 = time.perf_counter()
    head = tok.encode_prompt("")
    train_prompts = split_prompts(open_tokens(run_dir / "data", "train"), cfg.prompts, head,
                                  cfg.min_prompt_tokens, cfg.max_prompt_tokens, cfg.seed)
    data = teacher_sequences(target, train_prompts, cfg.new_tokens, cfg.teacher_batch,
                             show_progress=show_progress)
    held_out = teacher_sequences(target, held_out_prompts(run_dir, cfg.held_out_prompts, head, seed=cfg.seed,
                                                          min_len=cfg.min_prompt_tokens,
                                                          max_len=cfg.max_prompt_tokens),
                                 cfg.new_tokens, cfg.teacher_batch, desc="draft teacher (held-out)",
                                 show_progress=show_progress)
    teacher_s = time.perf_counter() - t0
    info = dist.setup(train_cfg.device)
    try:
        torch.manual_seed(train_cfg.seed)
        mc = model_config or draft_config(target.config)
        draft = LlamaModel(mc)
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = DistillStage(data, held_out, train_cfg.batch_size, cfg.seed, info.rank, info.world)
        trainer = Trainer(draft, stage, train_cfg, out_dir, info, show_progress, name="draft")
        t1 = time.perf_counter()
        final = trainer.fit() or trainer.evaluate()
        train_s = time.perf_counter() - t1
        if info.is_main:
            save_pretrained(draft, out_dir)
            tok.save(out_dir, model_max_length=mc.max_position_embeddings)
    finally:
        dist.teardown()
    return {**final, "parameters": mc.num_parameters(), "steps": train_cfg.max_steps,
            "teacher_tokens": int((data[1] != IGNORE).sum()), "teacher_s": round(teacher_s, 2),
            "train_s": round(train_s, 2)}


@dataclass
class SpeedrunDraft(DraftConfig):
    """The speculative draft's distillation in the speedrun: `--draft.KEY=VALUE`."""

    # 1,000 steps on 2,048 teacher continuations: 91.3% held-out agreement and 3.97 tokens per target
    # forward at k=4 (on 8 held-out prompts), vs 90.3% and 3.75 for 500 steps and 87.5% for 300 steps
    # on 1,024; ~77 s of training after ~37 s of teacher data on 2 cores. 4,096 continuations for 1,000
    # steps gave 93.1% but 3.85 tokens per forward, for 35 s more of teacher data.
    steps: int = 1000


def speedrun_draft(ctx: Context, target: LlamaModel) -> dict[str, Any]:
    """The speedrun's draft: distilled from the freshly trained target into RUN_DIR/draft with the
    pre-training recipe's settings, `ctx.recipe.draft` (a `SpeedrunDraft`) saying how much."""
    knobs: SpeedrunDraft = ctx.recipe.draft
    train = copy.deepcopy(ctx.recipe.train)
    train.max_steps = knobs.steps
    train.warmup_steps = min(train.warmup_steps, knobs.steps // 10)
    train.eval_every = train.ckpt_every = 0
    train.resume = False  # the teacher data is made anew each time; so is the draft
    ctx.say(f"distilling the draft: {knobs.prompts:,} teacher continuations of {knobs.new_tokens} tokens, "
            f"then {knobs.steps} steps")
    return distill_draft(target, ctx.run_dir, ctx.run_dir / "draft", train, knobs,
                         show_progress=ctx.show_progress)
