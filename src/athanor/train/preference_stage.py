"""The speedrun's preference stage: verifier pairs -> DPO from the SFT model, a reward model, a judge.

After SFT (train/sft.py) the chat model answers the synthetic tasks, sometimes right. This stage
shows the three ways the post-training map learns from comparisons, on that model:

1. **Verifier pairs**: the SFT model samples k answers to each of its own training tasks (never a
   held-out one), the grader marks them, and a passing answer is paired with a failing one
   (data/verifier_pairs.py). These are on-policy pairs: the rejected answers are mistakes this model
   makes.
2. **DPO** from the SFT model on those pairs, with the chosen answers' NLL added (RPO, `rpo_alpha`):
   without it DPO lowers the chosen answers' likelihood along with the rejected ones', which on this
   model breaks the Python answers (measured: BENCHMARKS.md, "DPO on the speedrun's SFT model").
   Both models then answer the SFT run's held-out tasks: greedy pass@1, and pass@1 sampled at a
   temperature (the share of n samples per task that pass; what DPO changes is the distribution,
   which greedy decoding sees only through its mode). The difference is paired by task, with its
   95% interval over tasks.
3. **A reward model** trained on the same pairs, and its accuracy on the held-out pairs (Wilson
   interval); and **the SFT model as a judge** (RLAIF, rl/judge.py) of held-out pairs, both orders:
   its position consistency and its agreement with the verifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.data.corpus import is_held_out
from athanor.data.preferences import load_pairs
from athanor.data.synth import read_tasks
from athanor.data.verifier_pairs import VerifierConfig, make_verifier_pairs, write_pairs
from athanor.errors import AthanorError
from athanor.lm.local import LocalLM
from athanor.model.hf import load_pretrained
from athanor.report import markdown_table, resume_note
from athanor.rl.judge import JudgeConfig, judge_pairs, verifier_labels
from athanor.stage import Context, Section
from athanor.stats import paired_diff_text, paired_verdict, wilson_interval
from athanor.tokenizer import Tokenizer
from athanor.train.behavior import evaluate_behavior, sampled_pass_rates
from athanor.train.dpo import DPORecipe, PreferenceDataConfig, dpo
from athanor.train.loop import TrainConfig
from athanor.train.preference_loss import PreferenceLossConfig
from athanor.train.rm import RMRecipe, rm

TITLE = "Post-training: preference tuning (DPO, reward model, judge)"
HELDOUT_PAIRS = 0.1  # share of the pairs (by a hash of their line) that DPO and the RM hold out


@dataclass
class SpeedrunPreference:
    """The speedrun's preference stage: `--preference.KEY=VALUE` on `athanor speedrun`."""

    pair_tasks: int = 600  # SFT training tasks the SFT model answers to make verifier pairs
    k: int = 8  # answers sampled per task
    temperature: float = 0.7  # of those answers
    dpo_steps: int = 100
    dpo_lr: float = 1e-4
    beta: float = 0.1
    rpo_alpha: float = 1.0  # weight of the chosen answers' NLL in the DPO loss (0: plain DPO)
    rm_steps: int = 40
    judge_pairs: int = 32  # held-out pairs the SFT model judges, each in both orders
    eval_samples: int = 8  # sampled replies per held-out task for the sampled pass@1
    eval_temperature: float = 1.0


def _train(steps: int, lr: float, device: str) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=8, seq_len=256, lr=lr, warmup_steps=min(10, steps // 5),
                       eval_every=0, eval_tokens=0, ckpt_every=steps, log_every=10, weight_decay=0.0, device=device)


def _pct(rate: float, low: float, high: float) -> str:
    return f"{rate:.1%} [{low:.1%}, {high:.1%}]"


def speedrun_stage(ctx: Context) -> Section:
    knobs: SpeedrunPreference = ctx.recipe.preference
    sft_dir = Path(ctx.results["sft"]["run_dir"])
    run, device, eval_tokens = ctx.run_dir, ctx.recipe.train.device, ctx.recipe.sft.max_new_tokens
    heldout = read_tasks(sft_dir / "data" / "heldout.jsonl")
    tasks = read_tasks(sft_dir / "data" / "train.jsonl")[:knobs.pair_tasks]
    held_prompts = {t.prompt for t in heldout}
    if any(t.prompt in held_prompts for t in tasks):  # the SFT split guarantees it; the report states it
        raise AthanorError("a held-out task's prompt is among the pair tasks", path=sft_dir / "data")

    ctx.say(f"the SFT model answers {len(tasks):,} of its training tasks {knobs.k} times (temperature "
            f"{knobs.temperature}); passing and failing answers of one task make a pair")
    pairs_path = run / "preference" / "pairs.jsonl"
    pairs_path.parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(sft_dir)
    sft_model = load_pretrained(sft_dir)
    records, pair_report = make_verifier_pairs(
        LocalLM(sft_model, tok, max_batch=64), tasks,
        VerifierConfig(k=knobs.k, temperature=knobs.temperature, max_tokens=eval_tokens, batch_tasks=64 // knobs.k),
        show_progress=ctx.show_progress)
    if not records:  # a model that passes nothing, or everything, gives no preference to learn
        ctx.results["preference"] = None
        return Section(TITLE, f"No pairs: the SFT model's {pair_report['answers']:,} answers to {len(tasks):,} tasks "
                       f"passed at rate {pair_report['pass_rate']:.1%}, and no task had both a passing and a "
                       "failing answer. A longer pre-training and SFT (the defaults) give a model that sometimes "
                       "passes; then DPO, the reward model and the judge run here.")
    write_pairs(pairs_path, records, pair_report)
    data = PreferenceDataConfig(paths=[str(pairs_path)], heldout_fraction=HELDOUT_PAIRS)

    ctx.say(f"DPO from the SFT model on {len(records)} pairs, {knobs.dpo_steps} steps (beta {knobs.beta}, "
            f"rpo_alpha {knobs.rpo_alpha})")
    dpo_dir = run / "dpo"
    dpo_result = dpo(DPORecipe(out_dir=str(dpo_dir), base=str(sft_dir), data=data,
                               loss=PreferenceLossConfig(beta=knobs.beta, rpo_alpha=knobs.rpo_alpha),
                               train=_train(knobs.dpo_steps, knobs.dpo_lr, device)), show_progress=ctx.show_progress)

    ctx.say(f"{len(heldout)} held-out tasks: greedy, and {knobs.eval_samples} samples each at temperature "
            f"{knobs.eval_temperature}, from the SFT and the DPO model")
    dpo_model = load_pretrained(dpo_dir)
    greedy = {name: evaluate_behavior(m, tok, heldout, eval_tokens) for name, m in
              (("SFT", sft_model), ("DPO", dpo_model))}
    sampled = {name: sampled_pass_rates(m, tok, heldout, knobs.eval_samples, knobs.eval_temperature, eval_tokens,
                                        seed=1) for name, m in (("SFT", sft_model), ("DPO", dpo_model))}
    del dpo_model

    ctx.say(f"a reward model on the same pairs, {knobs.rm_steps} steps; the SFT model judges "
            f"{knobs.judge_pairs} held-out pairs in both orders")
    rm_result = rm(RMRecipe(out_dir=str(run / "rm"), base=str(sft_dir), data=data,
                            train=_train(knobs.rm_steps, 1e-4, device)), show_progress=ctx.show_progress)
    held_pairs = [p for p in load_pairs(pairs_path) if is_held_out(f"{pairs_path.name}:{p.line}", HELDOUT_PAIRS)]
    judged = held_pairs[:knobs.judge_pairs]
    judge_report = judge_pairs(LocalLM(sft_model, tok), judged, JudgeConfig(),
                               verifier_labels(judged, tasks))[1] if judged else None

    result = {"pairs": pair_report, "dpo": dpo_result, "rm": rm_result, "judge": judge_report,
              "heldout_tasks": len(heldout),
              "greedy_pass": {k: v["pass_rate"] for k, v in greedy.items()},
              "sampled_pass": {k: sum(v) / len(v) for k, v in sampled.items()}}
    ctx.results["preference"] = result
    return Section(TITLE, _markdown(knobs, result, greedy, sampled, rm_result, judge_report, len(tasks), run, sft_dir),
                   note=resume_note(dpo_result["resumed_from_step"], knobs.dpo_steps))


def _markdown(knobs: SpeedrunPreference, result: dict[str, Any], greedy: dict[str, dict], sampled: dict[str, list],
              rm_result: dict[str, Any], judge: dict[str, Any] | None, n_tasks: int, run: Path, sft_dir: Path) -> str:
    n = result["heldout_tasks"]
    p = result["pairs"]
    rows = []
    for name in ("SFT", "DPO"):
        passed = round(greedy[name]["pass_rate"] * n)
        rows.append({"model": name, "greedy pass@1, 95% interval": _pct(passed / n, *wilson_interval(passed, n)),
                     f"sampled pass@1 (T={knobs.eval_temperature}, {knobs.eval_samples}/task)":
                     f"{sum(sampled[name]) / n:.1%}",
                     **{f"greedy: {k}": f"{v['pass_rate']:.0%}" for k, v in greedy[name]["by_kind"].items()}})
    greedy_diff = [float(b) - float(a) for a, b in zip(greedy["SFT"]["passed"], greedy["DPO"]["passed"], strict=True)]
    sampled_diff = [b - a for a, b in zip(sampled["SFT"], sampled["DPO"], strict=True)]
    d = result["dpo"]
    lines = [
        f"The SFT model answered {n_tasks:,} of its training tasks {knobs.k} times each at temperature "
        f"{knobs.temperature}: {p['pass_rate']:.0%} of the {p['answers']:,} answers passed; "
        f"{p['tasks_with_pairs']} tasks had both a passing and a failing answer and gave {p['pairs']} pairs "
        f"(`preference/pairs.jsonl`; {p['tasks_all_passed']} tasks all passed, {p['tasks_all_failed']} all "
        f"failed). No held-out task's prompt is among them.",
        "",
        f"**DPO** ({knobs.dpo_steps} steps from the SFT model, beta {knobs.beta}, the chosen answers' NLL at "
        f"weight {knobs.rpo_alpha}, `dpo/`): on {d['heldout_pairs']} held-out pairs, "
        f"rewards/accuracies {d.get('val_rewards/accuracies', float('nan')):.0%}, "
        f"rewards/margins {d.get('val_rewards/margins', float('nan')):+.3f}. Then both models answered the "
        f"{n} held-out tasks of the SFT stage:",
        "",
        markdown_table(rows),
        "",
        f"DPO minus SFT, paired by task (95% interval over the {n} tasks): greedy pass@1 "
        f"{paired_diff_text(greedy_diff)}, sampled pass@1 {paired_diff_text(sampled_diff)}. So DPO "
        f"{paired_verdict(sampled_diff)} the sampled pass@1 (the chance that "
        f"one reply sampled at temperature {knobs.eval_temperature} solves a task, Chen et al. 2021) and "
        f"{paired_verdict(greedy_diff)} the greedy one (the mode of the distribution, which moves last).",
        "",
    ]
    if rm_result.get("heldout_pairs"):
        k = round(rm_result["val_accuracy"] * rm_result["heldout_pairs"])
        lines += [f"**Reward model** ({knobs.rm_steps} steps on the same {rm_result['train_pairs']} training pairs, "
                  f"`rm/`, loads in transformers as a sequence classifier): it ranks the chosen answer higher on "
                  f"{_pct(k / rm_result['heldout_pairs'], *wilson_interval(k, rm_result['heldout_pairs']))} of "
                  f"{rm_result['heldout_pairs']} held-out pairs.", ""]
    if judge is not None:
        agreement, known = judge.get("verifier_agreement"), judge.get("verifier_known_consistent", 0)
        agrees = f"it agrees with the verifier on {agreement:.0%} of the {known} it could check" \
            if agreement is not None else "none could be checked against the verifier"
        lines += [f"**The SFT model as a judge** (RLAIF) of {judge['comparisons']} held-out pairs, each shown in both "
                  f"orders: position-consistent on {judge['position_consistency']:.0%} (it named the first answer "
                  f"in {judge['first_position_rate'] or 0:.0%} of its parsed verdicts; "
                  f"{judge['unparsed_verdicts']} verdicts unparsed); of its consistent verdicts {agrees}. "
                  "A model this small is no judge yet; `athanor pairs judge --judge URL` takes any "
                  "OpenAI-compatible endpoint.", ""]
    lines += ["**Over-optimization and PPO**, each a few minutes on 2 cores, on this run's models: best-of-n by the "
              "reward model against the verifier's gold reward, as KL from the SFT model grows (Gao et al. 2022; "
              "writes overopt.md with its plot and what it shows), and RLHF with PPO against the same reward model "
              "(proxy and gold reward per rollout in its metrics.jsonl):", "", "```bash",
              f"athanor overopt --policy {sft_dir} --rm {run / 'rm'} --tasks {sft_dir / 'data' / 'heldout.jsonl'} "
              f"--out {run / 'overopt'}",
              f"athanor ppo --recipe recipes/ppo.yaml --base {sft_dir} --reward {run / 'rm'} --out {run / 'ppo'}",
              "```", "", "![DPO loss curve](dpo/loss.png)"]
    return "\n".join(lines)

