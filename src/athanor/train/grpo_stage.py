"""The speedrun's RLVR stage: a short GRPO run from the SFT model on execution rewards, and its audit.

After SFT (train/sft.py) the chat model solves some of its synthetic tasks. Here it answers its own
training tasks G times per prompt, the verifier grades every answer (exact match, or the unit tests
in the sandbox), and GRPO (train/grpo.py) moves the policy toward the answers that beat their group.
Held-out pass@1 (the SFT run's held-out tasks, never prompted) is measured before and after, greedy
and sampled, paired by task with 95% intervals; every completion trained on is audited for reward
hacking (rl/audit.py). The longer version is `recipes/rlvr.yaml`; the hack made visible is
`recipes/reward-hack.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.report import markdown_table, read_metrics, resume_note
from athanor.rl.audit import audit_log
from athanor.rl.grpo import GRPOLossConfig
from athanor.stage import Context, Section
from athanor.stats import interval_verdict, points_text
from athanor.train.grpo import CURVES, GRPOConfig, GRPORecipe, grpo
from athanor.train.loop import TrainConfig
from athanor.train.ppo import TaskDataConfig

TITLE = "Post-training: RL on verifiable rewards (GRPO)"
MICRO_BATCH = 32  # rows per forward; an optimizer step takes a whole generation batch


@dataclass
class SpeedrunGRPO:
    """The speedrun's GRPO stage: `--grpo.KEY=VALUE` on `athanor speedrun`."""

    steps: int = 30  # optimizer steps, one per generation batch
    prompts_per_step: int = 16
    num_generations: int = 8  # G: answers per prompt
    lr: float = 1e-4
    temperature: float = 1.0
    # Arithmetic is left out of the prompts: the speedrun's SFT model solves none, so those groups are
    # all-zero and teach nothing. The held-out set keeps every kind.
    train_kinds: list[str] = field(default_factory=lambda: ["string", "list", "python"])
    eval_samples: int = 8  # sampled replies per held-out task for the sampled pass@1
    eval_temperature: float = 1.0


def _points(entry: dict[str, Any]) -> str:
    if "diff" not in entry:
        return "n/a"
    return points_text(entry["diff"], entry["diff_low"], entry["diff_high"])


def _reading(held: dict[str, dict[str, Any]]) -> list[str]:
    """What the table shows, in words: a change only where the paired interval excludes 0."""
    verdicts = {how: interval_verdict(e["diff_low"], e["diff_high"]) for how, e in held.items() if "diff" in e}
    if not verdicts:
        return []
    text = "So GRPO " + " and ".join(f"{v} the {how} pass@1" for how, v in verdicts.items()) + "."
    if verdicts.get("sampled") == "raised" and verdicts.get("greedy") != "raised":
        text += (" RL on a 0/1 reward sharpened the sampling distribution toward answers the model already "
                 "finds; its mode, the greedy answer, did not follow.")
    return [text, ""]


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def speedrun_stage(ctx: Context) -> Section:
    knobs: SpeedrunGRPO = ctx.recipe.grpo
    sft_dir = Path(ctx.results["sft"]["run_dir"])
    out_dir = ctx.run_dir / "grpo"
    rows = knobs.prompts_per_step * knobs.num_generations
    micro = min(MICRO_BATCH, rows)
    recipe = GRPORecipe(
        out_dir=str(out_dir), base=str(sft_dir),
        data=TaskDataConfig(paths=[str(sft_dir / "data" / "train.jsonl")],
                            heldout=str(sft_dir / "data" / "heldout.jsonl"), train_kinds=knobs.train_kinds),
        grpo=GRPOConfig(prompts_per_step=knobs.prompts_per_step, num_generations=knobs.num_generations,
                        temperature=knobs.temperature, eval_samples=knobs.eval_samples,
                        eval_temperature=knobs.eval_temperature,
                        loss=GRPOLossConfig(loss_type="dapo", epsilon_high=0.28,
                                            max_completion_length=ctx.recipe.sft.max_new_tokens)),
        train=TrainConfig(max_steps=knobs.steps, batch_size=micro, grad_accum=max(1, rows // micro), lr=knobs.lr,
                          schedule="constant", warmup_steps=0, weight_decay=0.0, eval_every=0, eval_tokens=0,
                          ckpt_every=knobs.steps, log_every=1, device=ctx.recipe.train.device))
    ctx.say(f"GRPO from the SFT model: {knobs.steps} steps of {knobs.prompts_per_step} prompts x "
            f"{knobs.num_generations} answers ({', '.join(knobs.train_kinds)}), reward = the verifier; held-out "
            "pass@1 before and after")
    result = grpo(recipe, show_progress=ctx.show_progress)
    audit = audit_log(out_dir)
    ctx.results["grpo"] = {"heldout": result.get("heldout"), "flagged_rate": audit["flagged_rate"]}
    return Section(TITLE, _markdown(knobs, result, audit, out_dir, sft_dir),
                   note=resume_note(result["resumed_from_step"], knobs.steps))


def _markdown(knobs: SpeedrunGRPO, result: dict[str, Any], audit: dict[str, Any], out_dir: Path, sft_dir: Path
              ) -> str:
    batches = [r for r in read_metrics(out_dir / "metrics.jsonl") if "reward" in r]
    window = max(1, min(5, len(batches) // 3))
    held = result.get("heldout", {})
    table = [{"held-out pass@1": {"greedy": "greedy", "sampled": f"sampled (T={knobs.eval_temperature}, "
                                                               f"{knobs.eval_samples}/task)"}[how],
              "SFT model": f"{e['before']:.1%}", "after GRPO": f"{e['after']:.1%}",
              "difference, paired by task (95% interval)": _points(e)} for how, e in held.items()]
    rules = ", ".join(f"{r} {c}" for r, c in audit["by_rule"].items() if c) or "none"
    n = next(iter(held.values()))["tasks"] if held else 0
    lines = [
        f"GRPO (`grpo/`) from the SFT model: {knobs.steps} optimizer steps, each on {knobs.prompts_per_step} of the "
        f"SFT run's training tasks ({', '.join(knobs.train_kinds)}) answered {knobs.num_generations} times at "
        f"temperature {knobs.temperature}; reward 1 for a right answer (exact match, or the unit tests pass in the "
        f"sandbox), else 0; advantages normalized within each group, the DAPO token-level loss with clip-higher, "
        f"no KL, learning rate {knobs.lr}. Then both models answered the SFT stage's {n} held-out tasks:",
        "",
        markdown_table(table),
        "",
        *(_reading(held) if held else []),
    ]
    if batches:
        first, last = batches[:window], batches[-window:]
        lines += [f"Training reward (mean of the first and last {window} batches): {_mean(first, 'reward'):.3f} -> "
                  f"{_mean(last, 'reward'):.3f}; groups with no variance (nothing to learn from): "
                  f"{_mean(first, 'frac_reward_zero_std'):.0%} -> {_mean(last, 'frac_reward_zero_std'):.0%}; "
                  f"entropy {_mean(first, 'entropy'):.2f} -> {_mean(last, 'entropy'):.2f} nats per token.", ""]
    lines += [
        f"**Audit** of the {audit['completions']:,} completions trained on (`athanor audit {out_dir}`): "
        f"{audit['flagged']} flagged ({audit['flagged_rate']:.1%}; by rule: {rules}). The verifier runs the tests "
        "to their end in a fresh sandbox, so an early exit earns nothing here; with a grader that trusts the exit "
        "status the same hack spreads (the experiment: `recipes/reward-hack.yaml`).",
        "",
        "The longer run (`recipes/rlvr.yaml`; the hack experiment's commands are in `recipes/reward-hack.yaml`):",
        "",
        "```bash",
        f"athanor grpo --recipe recipes/rlvr.yaml --base {sft_dir} --data {sft_dir / 'data' / 'train.jsonl'} "
        f"--data.heldout={sft_dir / 'data' / 'heldout.jsonl'}",
        "```",
        "",
        f"![GRPO curves: reward, entropy, completion length](grpo/{CURVES})",
    ]
    return "\n".join(lines)
