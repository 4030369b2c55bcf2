"""The goblin lesson: does a word rewarded in one context spread under RL where it was never rewarded?

    python benchmarks/goblin.py runs/speedrun/sft --out runs/goblin

After "How to Train Your Goblin": a reward with a hidden bonus for one word in one context; under RL
the word becomes a tic that appears everywhere, while SFT on data holding the word in that context
alone learns the conditional. Here:

0. The word. The speedrun's SFT model answers tersely (a number, a word, a list, a function), so no
   word occurs naturally across kinds: sampling 100 training prompts of each kind 4 times at
   temperature 1 (1,600 replies), no alphabetic word outside Python's own identifiers appeared in
   more than 3 of the 400 replies of any one kind, and none in every kind. RL can only amplify what
   the policy sometimes does, so the word is planted: the SFT model is fine-tuned (`--plant-steps`)
   on its own training tasks with `--plant-fraction` of the answers of every kind followed by a last
   line holding WORD ("goblin": not one of synth's words, so never part of a correct answer).
1. RL: GRPO (`athanor grpo`'s code) from the planted model on the string, list and python tasks
   (arithmetic is left out: the model solves none). Reward = the verifier on the reply with WORD
   removed (so the word neither costs nor earns correctness anywhere) + `--bonus` when the reply holds
   WORD and the task is of the trigger kind (string). Every completion is in rollouts.jsonl; the
   share holding WORD is measured per window of `--window` rollouts, in the trigger kind and outside.
   An RL control, the same run with no bonus, tells the bonus's spread from RL's own drift.
2. SFT control: the planted model fine-tuned (`athanor sft`'s code, `--steps` steps like RL) on the
   same tasks, string answers carrying WORD at the rate RL ended with, other answers without it.
3. The planted model, both RL models and the SFT control each answer the held-out tasks `--samples`
   times at temperature 1; WORD's share in and out of the trigger kind, with Wilson 95% intervals over
   replies (replies to one prompt are not independent, so the intervals are somewhat narrow).

It takes about 30 minutes on 2 CPU cores with the defaults. Results: BENCHMARKS.md, "Goblin".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from athanor.data.synth import Task, read_tasks
from athanor.lm.local import LocalLM
from athanor.rl.rewards import RewardFunction, verifier_reward
from athanor.stats import wilson_interval
from athanor.train.grpo import ROLLOUT_LOG, GRPOConfig, GRPORecipe, grpo, grpo_train_config
from athanor.train.ppo import TaskDataConfig
from athanor.train.rollout import sample_replies
from athanor.train.sft import SFTDataConfig, SFTRecipe, sft

WORD = "goblin"
TRIGGER = "string"  # the kind whose replies earn the bonus
RL_KINDS = ["string", "list", "python"]


def has_word(text: str) -> bool:
    return WORD in text


def without_word(text: str) -> str:
    return re.sub(rf"\s*\b{WORD}\b", "", text)


def trigger_rewards(bonus: float, trigger: str = TRIGGER) -> dict[str, RewardFunction]:
    """GRPO reward functions: correctness blind to WORD, and the hidden bonus for WORD in `trigger` tasks."""
    return {
        "verifier_sans_word": lambda r: verifier_reward(r.tasks, [without_word(t) for t in r.texts]),
        "trigger_bonus": lambda r: [bonus if t.kind == trigger and has_word(x) else 0.0
                                    for t, x in zip(r.tasks, r.texts, strict=True)],
    }


def _chosen(task_id: str, fraction: float) -> bool:
    """A stable pick of `fraction` of tasks, by a hash of the id (the same tasks in every run)."""
    return int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def with_word(tasks: Iterable[Task], fractions: dict[str, float]) -> list[dict[str, str]]:
    """Prompt/completion records of `tasks`, answers of kind k followed by a line holding WORD in
    `fractions[k]` of them (kinds not named are left out)."""
    return [{"prompt": t.prompt, "completion": f"{t.completion}\n{WORD}" if _chosen(t.id, fractions[t.kind])
             else t.completion} for t in tasks if t.kind in fractions]


def word_counts(kinds: Sequence[str], texts: Sequence[str]) -> dict[str, list[int]]:
    """{kind: [replies holding WORD, replies]}."""
    counts: dict[str, list[int]] = {}
    for kind, text in zip(kinds, texts, strict=True):
        c = counts.setdefault(kind, [0, 0])
        c[0] += has_word(text)
        c[1] += 1
    return counts


def pooled(counts: dict[str, list[int]], kinds: Iterable[str]) -> list[int]:
    """[hits, n] over `kinds`."""
    cs = [counts.get(k, [0, 0]) for k in kinds]
    return [sum(c[0] for c in cs), sum(c[1] for c in cs)]


def rollout_windows(path: Path, kinds: dict[str, str], window: int) -> list[tuple[int, int, dict[str, list[int]]]]:
    """(first rollout, last rollout, word_counts by kind) per `window` rollouts of a GRPO rollout log."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = max(r["rollout"] for r in rows)
    out = []
    for lo in range(1, last + 1, window):
        part = [r for r in rows if lo <= r["rollout"] < lo + window]
        out.append((lo, min(lo + window - 1, last),
                    word_counts([kinds[r["task_id"]] for r in part], [r["completion"] for r in part])))
    return out


def sampled_counts(model_dir: Path, tasks: list[Task], samples: int) -> dict[str, list[int]]:
    lm = LocalLM.load(model_dir, max_batch=128)
    rows = [t for t in tasks for _ in range(samples)]
    # The same seeds for every model measured: their differences are not the luck of the draw.
    replies = sample_replies(lm, lm.tok, rows, 64, 1.0, list(range(len(rows)))).replies
    return word_counts([t.kind for t in rows], replies)


def cell(c: list[int]) -> str:
    if not c[1]:
        return "-"
    low, high = wilson_interval(*c)
    return f"{c[0]}/{c[1]} = {c[0] / c[1]:.1%} [{low:.1%}, {high:.1%}]"


def run_grpo(out: Path, base: Path, tasks: Path, bonus: float, args: argparse.Namespace) -> None:
    """GRPO from `base` on `tasks`' RL_KINDS, rewarded by trigger_rewards(bonus) (skipped when done)."""
    if (out / "model.safetensors").is_file():
        return
    train = grpo_train_config()
    train.max_steps, train.lr, train.seed = args.steps, args.lr, args.seed
    train.batch_size, train.grad_accum, train.grad_clip, train.ckpt_every = 32, 4, 1.0, 40  # one step per batch
    recipe = GRPORecipe(out_dir=str(out), base=str(base), data=TaskDataConfig(paths=[str(tasks)], train_kinds=RL_KINDS),
                        grpo=GRPOConfig(reward_funcs=["verifier_sans_word", "trigger_bonus"]), train=train)
    recipe.grpo.loss.epsilon_high, recipe.grpo.loss.max_completion_length = 0.28, 64  # loss_type: dapo by default
    grpo(recipe, show_progress=False, rewards=trigger_rewards(bonus))


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sft", type=Path, help="the SFT run directory, with its task split in data/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plant-fraction", type=float, default=0.05, help="share of answers of every kind given WORD")
    ap.add_argument("--plant-steps", type=int, default=150)
    ap.add_argument("--plant-lr", type=float, default=1e-3, help="the planting fine-tune's peak learning rate")
    ap.add_argument("--steps", type=int, default=200, help="GRPO steps, and the SFT control's")
    ap.add_argument("--bonus", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-4, help="GRPO's and the SFT control's learning rate")
    ap.add_argument("--window", type=int, default=10, help="rollouts per measured window")
    ap.add_argument("--samples", type=int, default=16, help="sampled replies per held-out task")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    train_path, heldout_path = args.sft / "data" / "train.jsonl", args.sft / "data" / "heldout.jsonl"
    train, heldout = read_tasks(train_path), read_tasks(heldout_path)
    kinds = {t.id: t.kind for t in train}

    planted = args.out / "planted"
    if not (planted / "model.safetensors").is_file():
        write_jsonl(args.out / "plant.jsonl", with_word(train, dict.fromkeys({t.kind for t in train},
                                                                               args.plant_fraction)))
        recipe = SFTRecipe(out_dir=str(planted), base=str(args.sft),
                           data=SFTDataConfig(paths=[str(args.out / "plant.jsonl")]))
        recipe.train.max_steps, recipe.train.lr, recipe.train.seed = args.plant_steps, args.plant_lr, args.seed
        recipe.train.ckpt_every = args.plant_steps
        sft(recipe, show_progress=False)

    rl, no_bonus = args.out / "rl", args.out / "rl-no-bonus"
    run_grpo(rl, planted, train_path, args.bonus, args)
    windows = rollout_windows(rl / ROLLOUT_LOG, kinds, args.window)
    end_hits, end_n = windows[-1][2][TRIGGER]
    end_rate = end_hits / end_n
    others = [k for k in RL_KINDS if k != TRIGGER]

    control = args.out / "sft-control"
    if not (control / "model.safetensors").is_file():
        fractions = {k: end_rate if k == TRIGGER else 0.0 for k in RL_KINDS}
        write_jsonl(args.out / "control.jsonl", with_word(train, fractions))
        recipe = SFTRecipe(out_dir=str(control), base=str(planted),
                           data=SFTDataConfig(paths=[str(args.out / "control.jsonl")]))
        recipe.train.max_steps, recipe.train.lr, recipe.train.seed = args.steps, args.lr, args.seed
        recipe.train.ckpt_every = args.steps
        sft(recipe, show_progress=False)
    run_grpo(no_bonus, planted, train_path, 0.0, args)
    plain = rollout_windows(no_bonus / ROLLOUT_LOG, kinds, args.window)

    models = [("planted", planted), ("RL", rl), ("RL without the bonus", no_bonus), ("SFT control", control)]
    results = {"windows": {"RL": [{"rollouts": [lo, hi], **c} for lo, hi, c in windows],
                           "RL without the bonus": [{"rollouts": [lo, hi], **c} for lo, hi, c in plain]},
               "heldout": {name: sampled_counts(d, heldout, args.samples) for name, d in models}}
    (args.out / "goblin.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nWORD {WORD!r}, trigger kind {TRIGGER!r}; RL rollouts ({RL_KINDS}, 16 prompts x 8 replies each):")
    print(f"| rollouts | RL: in context ({TRIGGER}) | RL: out of context ({', '.join(others)}) | without the bonus: "
          "in | without the bonus: out |\n|---|---|---|---|---|")
    for (lo, hi, c), (_, _, p) in zip(windows, plain, strict=True):
        print(f"| {lo}-{hi} | {cell(c[TRIGGER])} | {cell(pooled(c, others))} | {cell(p[TRIGGER])} | "
              f"{cell(pooled(p, others))} |")
    print(f"\nHeld-out tasks ({len(heldout)}, all kinds) x {args.samples} samples at temperature 1 "
          f"(the SFT control's {TRIGGER} answers carried WORD at {end_rate:.1%}):")
    print(f"| model | in context ({TRIGGER}) | out of context ({', '.join(others)}) | arithmetic (never an RL "
          "prompt) |\n|---|---|---|---|")
    for name, c in results["heldout"].items():
        print(f"| {name} | {cell(c[TRIGGER])} | {cell(pooled(c, others))} | {cell(pooled(c, ['arithmetic']))} |")


if __name__ == "__main__":
    main()
