"""Supervised fine-tuning: teach a base model the chat format, on the one trainer loop.

- Loss on the assistant's tokens only (the loss mask of `Tokenizer.render_chat`, from the base
  model's own chat template when it ships one): the model learns to answer and to close its turn,
  not to imitate users. A conversation the template cannot mask, or an example whose mask is
  empty (after truncation to `seq_len`), is rejected at load time with its file and line; a step
  whose batch holds no loss token is an error in the loop.
- Packing: conversations are laid end to end in rows of `seq_len` tokens, and a block-diagonal
  causal mask (through `attention_mask`) keeps each one from attending to its neighbours, so a
  packed row trains exactly like the conversations one by one, without the compute of padding.
- Evaluation: held-out loss on assistant tokens during training, and before and after training
  the behavior shift on held-out tasks (answer rate, pass rate; see behavior.py).

With no data given it trains on the synthetic verifiable tasks of data/synth.py.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from athanor.config import save_yaml
from athanor.data.formats import Example, iter_records, load_examples, render_example
from athanor.data.sampler import EpochSampler
from athanor.data.synth import KINDS, Task, make_splits, read_tasks, write_tasks
from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.model.hf import load_pretrained
from athanor.stage import Context, Section
from athanor.tokenizer import Tokenizer
from athanor.train import dist
from athanor.train.behavior import evaluate_behavior
from athanor.train.finetune import LoraSettings, maybe_apply_lora, save_trained
from athanor.train.loop import TrainConfig, Trainer

IGNORE = -100


@dataclass
class SFTDataConfig:
    paths: list[str] = field(default_factory=list)  # instruction data files; empty: synthetic tasks
    heldout: str | None = None  # held-out file (tasks or any instruction format); None: the synthetic split
    synth_train: int = 3000
    synth_heldout: int = 200
    synth_kinds: list[str] = field(default_factory=lambda: list(KINDS))
    seed: int = 0


@dataclass
class SFTRecipe:
    out_dir: str = "runs/sft"
    base: str = "runs/speedrun"  # run dir (or HF checkpoint) of the model to fine-tune
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=200, batch_size=8, seq_len=256, lr=1e-3, warmup_steps=10, eval_every=0, eval_tokens=0,
        ckpt_every=100, log_every=10, weight_decay=0.0))
    eval_max_new_tokens: int = 64  # reply budget of the behavior evaluation
    eval_tasks: int = 0  # held-out tasks for the behavior evaluation (0: all)


# -- data --------------------------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]  # 1 where the token is a loss target


def encode_examples(examples: list[Example], tok: Tokenizer, seq_len: int) -> list[Encoded]:
    """Render each conversation; keep at most seq_len + 1 tokens (inputs and shifted targets)."""
    out = []
    for ex in examples:
        ids, mask = render_example(tok, ex)
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if not any(mask[1:]):
            raise AthanorError(f"no assistant token left to learn from within seq_len={seq_len} "
                               "(the reply is empty or starts too late); shorten it or raise train.seq_len",
                               path=ex.path, line=ex.line)
        out.append(Encoded(ids, mask))
    return out


def pack(encoded: list[Encoded], seq_len: int, pad_id: int, seed: int) -> dict[str, torch.Tensor]:
    """Pack conversations into rows: inputs, targets (-100 = no loss) and segment ids (-1 = padding).

    Each conversation contributes inputs ids[:-1] and targets ids[1:], so no target crosses
    from one conversation into the next. Greedy first fit over a seeded shuffle.
    """
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []  # conversation indices per row
    room: list[int] = []
    for i in order:
        n = len(encoded[i].ids) - 1
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    x = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    seg = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for s, i in enumerate(members):
            e = encoded[i]
            n = len(e.ids) - 1
            x[r, pos:pos + n] = torch.tensor(e.ids[:-1])
            y[r, pos:pos + n] = torch.tensor([t if m else IGNORE for t, m in zip(e.ids[1:], e.mask[1:], strict=True)])
            seg[r, pos:pos + n] = s
            pos += n
    return {"x": x, "y": y, "seg": seg}


def block_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: a token sees earlier tokens of its own conversation only.

    Padding (segment -1) sees itself, so no attention row is empty (that would give NaN).
    """
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=seg.device)
    return ((same & causal & (seg[:, :, None] >= 0)) | eye)[:, None]


class SFTStage:
    """Shuffled packed rows, sharded over ranks; loss = summed cross-entropy on assistant tokens.

    A data set smaller than one global batch trains on batches of what there is per rank.
    """

    def __init__(self, rows: dict[str, torch.Tensor], heldout_rows: dict[str, torch.Tensor] | None,
                 batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.rows, self.heldout, self.batch_size = rows, heldout_rows, batch_size
        self.sampler = EpochSampler(len(rows["x"]), batch_size, seed, rank, world, what="packed rows", fit_batch=True)

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.sampler.next_indices())
        return {k: v[idx] for k, v in self.rows.items()}

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["y"] != IGNORE).sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return model(batch["x"], attention_mask=block_causal_mask(batch["seg"]), targets=batch["y"]), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.heldout is None:
            return {}
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(self.heldout["x"]), self.batch_size):
            b = {k: v[i:i + self.batch_size].to(device) for k, v in self.heldout.items()}
            total += float(model(b["x"], attention_mask=block_causal_mask(b["seg"]), targets=b["y"]))
            count += int((b["y"] != IGNORE).sum())
        return {"val_loss": total / max(count, 1)}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def _as_tasks(path: str) -> list[Task]:
    """Held-out tasks from a task file, or from any instruction file (graded by exact match)."""
    first = next((rec for _, rec in iter_records(path)), None)
    if isinstance(first, dict) and {"kind", "key", "prompt", "completion"} <= set(first):
        return read_tasks(path)
    tasks = []
    for ex in load_examples(path):
        users = [m["content"] for m in ex.messages if m["role"] == "user"]
        answer = [m["content"] for m in ex.messages if m["role"] == "assistant"][-1]
        tasks.append(Task(f"{Path(path).name}:{ex.line}", "chat", users[0] if users else "", answer, ""))
    return tasks


def prepare_data(recipe: SFTRecipe, out_dir: Path) -> tuple[list[Example], list[Example], list[Task]]:
    """(train examples, held-out examples, held-out tasks); the synthetic default is written to data/."""
    d = recipe.data
    data_dir = out_dir / "data"
    if not d.paths:
        if not (data_dir / "train.jsonl").is_file():
            train, heldout, report = make_splits(d.synth_train, d.synth_heldout, d.seed, d.synth_kinds)
            write_tasks(heldout, data_dir / "heldout.jsonl")
            atomic_write_text(data_dir / "overlap.json", json.dumps(report, indent=2) + "\n")
            write_tasks(train, data_dir / "train.jsonl")  # last: its presence means the set is complete
        train_paths, heldout_path = [str(data_dir / "train.jsonl")], str(data_dir / "heldout.jsonl")
    else:
        train_paths, heldout_path = d.paths, d.heldout
    train = [ex for p in train_paths for ex in load_examples(p)]
    if heldout_path is None:
        return train, [], []
    return train, load_examples(heldout_path), _as_tasks(heldout_path)


# -- the run -------------------------------------------------------------------------------------
def behavior_table(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, r in (("base", before), ("SFT", after)):
        rows.append({"model": name, "answers (closes its turn)": f"{r['answer_rate']:.0%}",
                     "held-out pass rate": f"{r['pass_rate']:.0%}",
                     **{f"pass: {k}": f"{v['pass_rate']:.0%}" for k, v in r["by_kind"].items()}})
    return rows


def sft(recipe: SFTRecipe, show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune `recipe.base` into `recipe.out_dir`; returns (and writes to eval.json) the results."""
    out_dir = Path(recipe.out_dir)
    info = dist.setup(recipe.train.device)
    try:
        tok = Tokenizer.load(recipe.base)
        model = load_pretrained(recipe.base, device=info.device)  # on the device already for the base eval
        cfg = recipe.train
        if cfg.seq_len + 1 > model.config.max_position_embeddings:
            raise AthanorError(f"train.seq_len {cfg.seq_len} leaves no room in the model's "
                               f"{model.config.max_position_embeddings} positions", field="train.seq_len")
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            prepare_data(recipe, out_dir)
            save_yaml(recipe, out_dir / "athanor.yaml")
        dist.barrier()
        train_ex, heldout_ex, tasks = prepare_data(recipe, out_dir)
        if recipe.eval_tasks:
            tasks = tasks[:recipe.eval_tasks]
        rows = pack(encode_examples(train_ex, tok, cfg.seq_len), cfg.seq_len, tok.pad_id, cfg.seed)
        held_rows = (pack(encode_examples(heldout_ex, tok, cfg.seq_len), cfg.seq_len, tok.pad_id, cfg.seed)
                     if heldout_ex else None)
        timings: dict[str, float] = {}
        before_path = out_dir / "eval_base.json"
        if tasks and info.is_main and not before_path.is_file():  # kept across resumes: the base never changes
            t = time.perf_counter()
            before = evaluate_behavior(model, tok, tasks, recipe.eval_max_new_tokens)
            timings["eval_base_s"] = time.perf_counter() - t
            atomic_write_text(before_path, json.dumps(before, indent=2) + "\n")

        lora_info = maybe_apply_lora(model, recipe.lora, cfg.seed)
        stage = SFTStage(rows, held_rows, cfg.batch_size, cfg.seed, info.rank, info.world)
        trainer = Trainer(model, stage, cfg, out_dir, info, show_progress, name="sft")
        t = time.perf_counter()
        final = trainer.fit() or (trainer.evaluate() if held_rows is not None else {})
        timings["train_s"] = time.perf_counter() - t
        result: dict[str, Any] = {**final, "steps": cfg.max_steps, "tokens_seen": trainer.tokens_seen,
                                  "train_examples": len(train_ex), "packed_rows": len(rows["x"]),
                                  "resumed_from_step": trainer.resumed_from}
        export = save_trained(trainer, recipe.base, lora_info, out_dir, tok, info)
        if export is not None:
            if lora_info is not None:
                result["trainable_parameters"] = lora_info.trainable
            if tasks:
                t = time.perf_counter()
                after = evaluate_behavior(export, tok, tasks, recipe.eval_max_new_tokens)
                timings["eval_sft_s"] = time.perf_counter() - t
                result["behavior"] = {"base": json.loads(before_path.read_text()), "sft": after}
            result.update({k: round(v, 2) for k, v in timings.items()})
            atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
        return result
    finally:
        dist.teardown()


# -- the speedrun's post-training stage ---------------------------------------------------------
SPEEDRUN_SFT_MAX_STEPS = 150  # about 45 s of the stage's 150 s budget on 2 cores


@dataclass
class SpeedrunSFT:
    """The speedrun's SFT stage: `--sft.KEY=VALUE` on `athanor speedrun`."""

    max_steps: int = 0  # 0: 3/8 of pre-training's steps, from 40 to SPEEDRUN_SFT_MAX_STEPS
    train_tasks: int = 3000  # synthetic training tasks
    heldout_tasks: int = 120  # held-out tasks both models answer, before and after
    max_new_tokens: int = 48  # reply budget of that evaluation


def speedrun_stage(ctx: Context) -> Section:
    """Speedrun: synthetic tasks -> full SFT of the pre-trained model -> the before/after table.

    SFT gets about 3/8 of pre-training's steps, at most `SPEEDRUN_SFT_MAX_STEPS`, so a shortened
    speedrun stays short, unless `sft.max_steps` says otherwise.
    """
    from athanor.report import markdown_table, resume_note
    from athanor.rl.sandbox import isolation_error

    knobs: SpeedrunSFT = ctx.recipe.sft
    steps = knobs.max_steps or min(SPEEDRUN_SFT_MAX_STEPS, max(40, ctx.recipe.train.max_steps * 3 // 8))
    # Python tasks are graded by running code, which only the sandbox may do: without one, leave them out.
    no_sandbox = isolation_error()
    kinds = [k for k in KINDS if k != "python"] if no_sandbox else list(KINDS)
    recipe = SFTRecipe(out_dir=str(ctx.run_dir / "sft"), base=str(ctx.run_dir),
                       data=SFTDataConfig(synth_train=knobs.train_tasks, synth_heldout=knobs.heldout_tasks,
                                          synth_kinds=kinds),
                       train=TrainConfig(max_steps=steps, batch_size=8, seq_len=256, lr=1e-3, warmup_steps=10,
                                         eval_every=0, ckpt_every=steps, log_every=10, weight_decay=0.0,
                                         device=ctx.recipe.train.device),
                       eval_max_new_tokens=knobs.max_new_tokens)
    ctx.say(f"{knobs.heldout_tasks} held-out tasks answered by the base model, {steps} steps of SFT on "
            f"{knobs.train_tasks:,} synthetic tasks, the same tasks answered by the SFT model")
    result = sft(recipe, show_progress=ctx.show_progress)
    before, after = result["behavior"]["base"], result["behavior"]["sft"]
    ctx.results["sft"] = {"answer_rate": {"base": before["answer_rate"], "sft": after["answer_rate"]},
                          "pass_rate": {"base": before["pass_rate"], "sft": after["pass_rate"]},
                          "run_dir": recipe.out_dir}
    overlap = json.loads((Path(recipe.out_dir) / "data" / "overlap.json").read_text())
    examples = "\n\n".join(f"{'PASS' if e['passed'] else 'FAIL'}  {e['prompt']}\n  -> {e['reply'][:160]}"
                           for e in after["examples"])
    text = "\n".join([
        f"The pre-trained model, fine-tuned for {steps} steps on {result['train_examples']:,} synthetic tasks "
        f"(arithmetic, strings, lists, Python functions; loss on the assistant's tokens only, packed), then both "
        f"asked the {before['tasks']} held-out tasks (greedy). The held-out split shares no task with training: "
        f"{overlap['exact_overlap']} exact and {overlap['near_duplicate_pairs']} near-duplicate pairs (word 3-gram "
        f"Jaccard >= {overlap['jaccard_threshold']}). *Answers* = closes its turn with `<|end|>`, rather than "
        "continuing the text; *pass* = exact match, or the unit tests pass in the sandbox."
        + (f" Python tasks left out: no sandbox here ({no_sandbox})." if no_sandbox else ""),
        "",
        markdown_table(behavior_table(before, after)),
        "",
        f"Held-out loss on assistant tokens: {result['val_loss']:.3f}. Replies of the SFT model:",
        "",
        "```text",
        examples,
        "```",
        "",
        f"**This is the chat model**: `{recipe.out_dir}` (Hugging Face layout, with the tokenizer). Talk to it "
        f"with `athanor chat {recipe.out_dir}`, or serve it (OpenAI-compatible API and a demo page) with "
        f"`athanor serve {recipe.out_dir}`.",
        "",
        "![SFT loss curve](sft/loss.png)",
    ])
    return Section("Post-training: SFT on synthetic tasks", text,
                   note=resume_note(result["resumed_from_step"], steps))
