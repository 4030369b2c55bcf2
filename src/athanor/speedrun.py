"""`athanor speedrun`: every stage that exists, end to end on the embedded default, with a report.

Pre-training (tokenizer -> shards -> model -> held-out eval) runs first; then each entry of
`STAGES` in order. A stage takes the `Context` and returns a `Section` of the report (the contract
in athanor/stage.py, which stages import: they never import this module), so a new capability
joins the speedrun by appending one function here, and its size knobs by one section of
`SpeedrunRecipe` (tests turn every one of them down).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from athanor.config import to_dict
from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.lm.local import LocalLM
from athanor.rag.stage import SpeedrunRAG
from athanor.report import markdown_table, resume_note
from athanor.serve.sampling import SamplingParams
from athanor.serve.stage import ServingSettings, serving_stage
from athanor.stage import Context, Section
from athanor.train.draft import SpeedrunDraft
from athanor.train.facts_stage import SpeedrunFacts
from athanor.train.grpo_stage import SpeedrunGRPO
from athanor.train.preference_stage import SpeedrunPreference
from athanor.train.pretrain import PretrainRecipe, pretrain
from athanor.train.sft import SpeedrunSFT

# The scorecard section's commentary compares these four (quant/scorecard.py, speedrun_markdown).
QUANT_TYPES_NEEDED = ("Q8_0", "Q4_K_M", "Q4_0", "Q2_K")


@dataclass
class SamplesSettings:
    """The samples section: `--samples.KEY=VALUE`."""

    max_tokens: int = 96  # tokens sampled per prompt


@dataclass
class QuantSettings:
    """The speedrun's damage scorecard, smaller than `athanor quantize scorecard`'s: `--quant.KEY=VALUE`."""

    types: list[str] = field(default_factory=lambda: ["Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q3_K", "Q2_K"])
    eval_tokens: int = 4096  # held-out tokens for perplexity / KLD / top-1
    imatrix_tokens: int = 4096  # calibration tokens of the importance matrix (0: none)
    answer_tokens: int = 24  # greedy tokens per prompt for answer similarity and decode speed


@dataclass
class SpeedrunRecipe(PretrainRecipe):
    """Pre-training's recipe plus a size knob section for each later stage (recipes/speedrun.yaml)."""

    out_dir: str = "runs/speedrun"
    samples: SamplesSettings = field(default_factory=SamplesSettings)
    sft: SpeedrunSFT = field(default_factory=SpeedrunSFT)
    preference: SpeedrunPreference = field(default_factory=SpeedrunPreference)
    grpo: SpeedrunGRPO = field(default_factory=SpeedrunGRPO)
    rag: SpeedrunRAG = field(default_factory=SpeedrunRAG)
    facts: SpeedrunFacts = field(default_factory=SpeedrunFacts)
    draft: SpeedrunDraft = field(default_factory=SpeedrunDraft)
    serving: ServingSettings = field(default_factory=ServingSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)


SAMPLE_PROMPTS = ["def ", "import os\n\n\nclass ", '    """Return the ']


def samples_stage(ctx: Context) -> Section:
    lm = LocalLM.load(ctx.run_dir)
    params = [SamplingParams(max_tokens=ctx.recipe.samples.max_tokens, temperature=0.8, top_k=50, seed=i)
              for i in range(len(SAMPLE_PROMPTS))]
    blocks = []
    for prompt, c in zip(SAMPLE_PROMPTS, lm.complete(SAMPLE_PROMPTS, params), strict=True):
        blocks += ["```python", prompt + c.text, "```", ""]
    return Section("Samples (temperature 0.8, top-k 50)", "\n".join(blocks))


def quant_stage(ctx: Context) -> Section:
    from athanor.quant.scorecard import ScorecardConfig, speedrun_markdown

    q = ctx.recipe.quant
    ctx.say(f"scoring {len(q.types)} quantization types on {q.eval_tokens:,} held-out tokens "
            f"(importance matrix from {q.imatrix_tokens:,} training tokens)")
    cfg = ScorecardConfig(types=tuple(q.types), eval_tokens=q.eval_tokens, imatrix_tokens=q.imatrix_tokens,
                          answer_tokens=q.answer_tokens)
    return Section("Quantization: damage scorecard", speedrun_markdown(ctx.run_dir, cfg))


def sft_stage(ctx: Context) -> Section:
    from athanor.train.sft import speedrun_stage

    return speedrun_stage(ctx)


def preference_stage(ctx: Context) -> Section:
    from athanor.train.preference_stage import speedrun_stage

    return speedrun_stage(ctx)


def grpo_stage(ctx: Context) -> Section:
    from athanor.train.grpo_stage import speedrun_stage

    return speedrun_stage(ctx)


def rag_stage(ctx: Context) -> Section:
    from athanor.rag.stage import speedrun_stage

    return speedrun_stage(ctx)


def facts_stage(ctx: Context) -> Section:
    from athanor.train.facts_stage import speedrun_stage

    return speedrun_stage(ctx)


# The order of the report: what pre-training made, post-training, then serving and quantizing the base.
STAGES: list[tuple[str, Callable[[Context], Section]]] = [
    ("samples from the base model", samples_stage), ("SFT: fine-tune on synthetic tasks", sft_stage),
    ("preference tuning: verifier pairs, DPO, reward model, judge", preference_stage),
    ("RLVR: GRPO on execution rewards, and its audit", grpo_stage),
    ("RAG: retrieval on questions about the standard library", rag_stage),
    ("facts: retrieval vs fine-tuning", facts_stage),
    ("serving: distill a speculative draft, measure decoding", serving_stage),
    ("quantization damage scorecard", quant_stage)]


def check_recipe(recipe: SpeedrunRecipe) -> None:
    """Refuse, before minutes of training, what a later stage could not use."""
    from athanor.quant.schemes import get_scheme

    for name in recipe.quant.types:
        get_scheme(name)  # an unknown type is an error now, not after pre-training
    missing = [t for t in QUANT_TYPES_NEEDED if t not in recipe.quant.types]
    if missing:
        raise AthanorError(f"the scorecard section compares {', '.join(QUANT_TYPES_NEEDED)}; "
                           f"add {', '.join(missing)}", field="quant.types")


def speedrun(recipe: SpeedrunRecipe, show_progress: bool = True) -> Path:
    """Run every stage and write `report.md` into `recipe.out_dir`; returns the report's path.

    The console gets one line as each stage starts, a progress bar named after it (unless
    `show_progress` is off), and the headline numbers at the end."""
    check_recipe(recipe)
    started = time.perf_counter()
    total = len(STAGES) + 1
    print(f"[1/{total}] pre-training: tokenizer, token shards, {recipe.train.max_steps} steps, held-out eval",
          flush=True)
    result = pretrain(recipe, show_progress=show_progress)
    ctx = Context(recipe, Path(recipe.out_dir), result, show_progress)
    sections = []
    for i, (name, stage) in enumerate(STAGES, start=2):
        print(f"[{i}/{total}] {name}", flush=True)
        t = time.perf_counter()
        section = stage(ctx)
        section.seconds = time.perf_counter() - t
        sections.append(section)
    report = render_report(ctx, sections, time.perf_counter() - started)
    atomic_write_text(ctx.run_dir / "report.md", report)
    print("\n".join(headline(ctx)), flush=True)
    return ctx.run_dir / "report.md"


def headline(ctx: Context) -> list[str]:
    """The numbers a newcomer looks for: base model quality, what SFT and DPO bought, serving speed."""
    r, sft, serving = ctx.pretrain, ctx.results["sft"], ctx.results["serving"]
    pref = ctx.results["preference"]
    return [
        f"held-out: {r['val_bpb']:.3f} bits/byte vs {r['unigram_bpb']:.3f} for the unigram baseline "
        f"({r['val_bpb'] / r['unigram_bpb']:.0%}), on {r['val_tokens']:,} tokens",
        f"SFT: answers {sft['answer_rate']['sft']:.0%} of held-out tasks (base {sft['answer_rate']['base']:.0%}), "
        f"passes {sft['pass_rate']['sft']:.0%} (base {sft['pass_rate']['base']:.0%}); chat with it: "
        f"athanor chat {sft['run_dir']}",
        (f"DPO: sampled pass@1 {pref['sampled_pass']['SFT']:.1%} -> {pref['sampled_pass']['DPO']:.1%}, greedy "
         f"{pref['greedy_pass']['SFT']:.1%} -> {pref['greedy_pass']['DPO']:.1%} on {pref['heldout_tasks']} held-out "
         "tasks (intervals in the report)") if pref else "DPO: no pairs (see the report)",
        _grpo_headline(ctx.results["grpo"]),
        _facts_headline(ctx.results["facts"]),
        f"serving: {serving['decode_tok_s']:,.0f} tok/s decode at batch 1, speculative decoding "
        f"{serving['speculative_speedup']:.2f}x",
    ]


def _grpo_headline(grpo: dict[str, Any]) -> str:
    held = grpo["heldout"] or {}
    moves = ", ".join(f"{how} pass@1 {e['before']:.1%} -> {e['after']:.1%}" for how, e in held.items())
    return f"GRPO: {moves or 'no held-out tasks'}; {grpo['flagged_rate']:.1%} of its completions flagged by the audit"


def _facts_headline(facts: dict[str, Any]) -> str:
    rate = facts["paraphrased"]
    return (f"facts never seen, paraphrased questions: fine-tuned {rate['a']:.0%}, retrieval {rate['b']:.0%}, both "
            f"{rate['c']:.0%} (SFT model {rate['0']:.0%}; {facts['n']} questions, intervals in the report)")


def _reused(flag: bool | None) -> str:
    return "reused: made by an earlier run in this directory" if flag else ""


def render_report(ctx: Context, sections: list[Section], total_s: float) -> str:
    result = ctx.pretrain
    ratio = result["val_bpb"] / result["unigram_bpb"]
    meta = json.loads((ctx.run_dir / "data" / "meta.json").read_text())
    run = ctx.run_dir
    timings = [
        {"stage": "tokenizer (byte-level BPE)", "seconds, this run": result["tokenizer_s"],
         "note": _reused(result.get("tokenizer_reused"))},
        {"stage": f"token shards ({meta['tokens']['train']:,} train / {meta['tokens']['val']:,} held-out tokens)",
         "seconds, this run": result["shards_s"], "note": _reused(result.get("shards_reused"))},
        {"stage": f"pre-training ({result['steps']} steps, {result['tokens_seen']:,} tokens)",
         "seconds, this run": result["train_s"], "note": resume_note(result["resumed_from_step"], result["steps"])},
        *({"stage": s.title, "seconds, this run": round(s.seconds, 2), "note": s.note} for s in sections),
    ]
    lines = [
        "# athanor speedrun report",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {'cuda' if torch.cuda.is_available() else 'cpu'}. Total time of this run {total_s / 60:.1f} min.",
        "",
        "## Held-out result",
        "",
        markdown_table([
            {"model": "unigram baseline (same tokenizer)", "bits per byte": f"{result['unigram_bpb']:.3f}"},
            {"model": f"athanor Llama, {result['parameters'] / 1e6:.1f}M params",
             "bits per byte": f"{result['val_bpb']:.3f}"},
        ]),
        "",
        f"The model needs {ratio:.0%} of the unigram baseline's bits to encode held-out text "
        f"(held-out loss {result['val_loss']:.3f} nats/token; both measured on {result['val_tokens']:,} held-out "
        f"tokens, `--train.eval_tokens`). Held-out documents were chosen by a hash of "
        f"their path and never seen in training, nor by the tokenizer.",
        "",
        "## The models this run made",
        "",
        markdown_table([
            {"directory": f"`{run / 'sft'}`", "what": "**the chat model** (the base after SFT)",
             "use it": f"`athanor chat {run / 'sft'}`, or `athanor serve {run / 'sft'}` for the API and demo page"},
            {"directory": f"`{run / 'dpo'}`", "what": "the chat model after DPO on verifier pairs",
             "use it": f"`athanor chat {run / 'dpo'}`; compare with the SFT model in Post-training: preference"},
            {"directory": f"`{run / 'rm'}`", "what": "a reward model (scores a prompt and answer; transformers "
             "loads it as a sequence classifier)", "use it": f"`athanor overopt --policy {run / 'sft'} --rm "
             f"{run / 'rm'} --out OUT`"},
            {"directory": f"`{run}`", "what": "the pre-trained base model (continues text; does not chat)",
             "use it": f"`athanor generate {run} --prompt \"def \"`, `athanor serve {run}`"},
            {"directory": f"`{run / 'draft'}`", "what": "a small draft distilled from the base, for speculative "
             "decoding", "use it": "see Serving"},
        ]),
        "",
        "## Stages and timings",
        "",
        "Seconds are what each stage took in this run; a stage an earlier run in this directory had already "
        "done (a rerun resumes) says so.",
        "",
        markdown_table(timings),
        "",
        "## Loss curves",
        "",
        "Pre-training (below), [SFT](sft/loss.png), [DPO](dpo/loss.png), [reward model](rm/loss.png), "
        "[draft distillation](draft/loss.png).",
        "",
        "![loss curve](loss.png)",
        "",
    ]
    for s in sections:
        lines += [f"## {s.title}", "", s.markdown.rstrip(), ""]
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(to_dict(ctx.recipe), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
