"""Does DPO raise pass@1? An SFT model against DPO variants trained on its own verifier pairs.

    python benchmarks/dpo_quality.py runs/speedrun/sft --out runs/dpo-quality

1. The SFT model answers `--tasks` synthetic training tasks `--k` times at `--temperature`; passing and
   failing answers of one task make pairs (`athanor pairs verifier`'s code).
2. Each variant trains from the SFT model on those pairs (`athanor dpo`'s code, full weights).
3. The SFT model and every variant answer `--heldout` held-out tasks of the same seed (none of them a
   pair's prompt): greedy, and `--samples` replies each at temperature 1. Each variant's difference
   from the SFT model is paired by task, with a 95% interval over tasks (athanor/stats.py).

It takes about 10 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from athanor.data.verifier_pairs import VerifierConfig, make_verifier_pairs, tasks_from_spec, write_pairs
from athanor.lm.local import LocalLM
from athanor.model.hf import load_pretrained
from athanor.stats import mean_interval
from athanor.tokenizer import Tokenizer
from athanor.train.behavior import evaluate_behavior, sampled_pass_rates
from athanor.train.dpo import DPORecipe, PreferenceDataConfig, dpo, preference_train_config
from athanor.train.preference_loss import PreferenceLossConfig

VARIANTS = [  # (name, run directory under --out, learning rate, rpo_alpha)
    ("DPO, lr 3e-5", "dpo-lr3e-5", 3e-5, 0.0),
    ("DPO, lr 1e-4", "dpo-lr1e-4", 1e-4, 0.0),
    ("DPO + NLL of chosen (rpo_alpha 1), lr 1e-4", "rpo-lr1e-4", 1e-4, 1.0),
]


def measure(model_dir: Path, tok: Tokenizer, tasks: list, samples: int) -> dict:
    model = load_pretrained(model_dir)
    greedy = evaluate_behavior(model, tok, tasks, 64)
    return {"greedy": [float(p) for p in greedy["passed"]],
            "sampled": sampled_pass_rates(model, tok, tasks, samples, 1.0, 64, seed=1)}


def difference(before: list[float], after: list[float]) -> str:
    mean, low, high = mean_interval([b - a for a, b in zip(before, after, strict=True)])
    return f"{mean * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sft", type=Path, help="the SFT run directory (e.g. runs/speedrun/sft)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", default="1500", help="training tasks the pairs come from")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--heldout", default="480", help="held-out tasks of seed 0 to measure on")
    ap.add_argument("--samples", type=int, default=8, help="sampled replies per held-out task")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()

    tok = Tokenizer.load(args.sft)
    pairs_path = args.out / "pairs.jsonl"
    records, report = make_verifier_pairs(
        LocalLM.load(args.sft), tasks_from_spec(args.tasks, 0, 120),
        VerifierConfig(k=args.k, temperature=args.temperature, batch_tasks=8), show_progress=True)
    write_pairs(pairs_path, records, report)
    heldout = tasks_from_spec(args.heldout, 0, 120, split="heldout")
    prompts = {r["prompt"][0]["content"] for r in records}
    assert not any(t.prompt in prompts for t in heldout), "a held-out task is among the pairs"
    print(f"{report['pairs']} pairs from {report['tasks']} tasks (pass rate {report['pass_rate']:.1%}); "
          f"measuring on {len(heldout)} held-out tasks", flush=True)

    results = {"SFT": measure(args.sft, tok, heldout, args.samples)}
    for name, run, lr, rpo_alpha in VARIANTS:
        train = preference_train_config()
        train.max_steps, train.lr, train.ckpt_every = args.steps, lr, args.steps
        out = args.out / run
        dpo(DPORecipe(out_dir=str(out), base=str(args.sft), data=PreferenceDataConfig(paths=[str(pairs_path)]),
                      loss=PreferenceLossConfig(rpo_alpha=rpo_alpha), train=train), show_progress=False)
        results[name] = measure(out, tok, heldout, args.samples)

    sft = results["SFT"]
    print(f"\n| model | greedy pass@1 | sampled pass@1 (T=1, {args.samples}/task) | greedy minus SFT, points "
          "[95%] | sampled minus SFT, points [95%] |\n|---|---|---|---|---|")
    for name, r in results.items():
        diffs = ("", "") if name == "SFT" else (difference(sft["greedy"], r["greedy"]),
                                               difference(sft["sampled"], r["sampled"]))
        print(f"| {name} | {sum(r['greedy']) / len(heldout):.1%} | {sum(r['sampled']) / len(heldout):.1%} | "
              f"{diffs[0]} | {diffs[1]} |")
    (args.out / "results.json").write_text(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
