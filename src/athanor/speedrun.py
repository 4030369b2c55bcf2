"""`athanor speedrun`: every stage that exists, end to end on the embedded default, with a report.

Pre-training (tokenizer -> shards -> model -> held-out eval) runs first; then each entry of
`STAGES` in order. A stage takes the `Context` and returns a `Section` of the report, so a new
capability joins the speedrun by appending one function here.
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
from athanor.io import atomic_write_text
from athanor.model.hf import load_pretrained
from athanor.report import markdown_table
from athanor.serve.generate import generate
from athanor.serve.stage import serving_stage
from athanor.tokenizer import Tokenizer
from athanor.train.pretrain import PretrainRecipe, pretrain


@dataclass
class Context:
    """What the stages after pre-training get: the recipe, the run directory, the results so far."""

    recipe: PretrainRecipe
    run_dir: Path
    pretrain: dict[str, Any]
    show_progress: bool = True
    results: dict[str, Any] = field(default_factory=dict)  # stages may leave numbers for later ones


@dataclass
class Section:
    title: str
    markdown: str
    seconds: float = 0.0


SAMPLE_PROMPTS = ["def ", "import os\n\n\nclass ", '    """Return the ']


def samples_stage(ctx: Context) -> Section:
    model = load_pretrained(ctx.run_dir)
    tok = Tokenizer.load(ctx.run_dir)
    blocks = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        ids = generate(model, [tok.bos_id, *tok.encode(prompt)], 96, temperature=0.8, top_k=50, seed=i,
                       stop_ids=[tok.bos_id, tok.eos_id])
        blocks += ["```python", prompt + tok.decode(ids), "```", ""]
    return Section("Samples (temperature 0.8, top-k 50)", "\n".join(blocks))


def quant_stage(ctx: Context) -> Section:
    from athanor.quant.scorecard import speedrun_markdown

    return Section("Quantization: damage scorecard", speedrun_markdown(ctx.run_dir))


def sft_stage(ctx: Context) -> Section:
    from athanor.train.sft import speedrun_stage

    return speedrun_stage(ctx)


# The order of the report: what pre-training made, post-training, then serving and quantizing the base.
STAGES: list[Callable[[Context], Section]] = [samples_stage, sft_stage, serving_stage, quant_stage]


def speedrun(recipe: PretrainRecipe, show_progress: bool = True) -> Path:
    """Run every stage and write `report.md` into `recipe.out_dir`; returns the report's path."""
    started = time.perf_counter()
    result = pretrain(recipe, show_progress=show_progress)
    ctx = Context(recipe, Path(recipe.out_dir), result, show_progress)
    sections = []
    for stage in STAGES:
        t = time.perf_counter()
        section = stage(ctx)
        section.seconds = time.perf_counter() - t
        sections.append(section)
    report = render_report(ctx, sections, time.perf_counter() - started)
    atomic_write_text(ctx.run_dir / "report.md", report)
    return ctx.run_dir / "report.md"


def render_report(ctx: Context, sections: list[Section], total_s: float) -> str:
    result = ctx.pretrain
    ratio = result["val_bpb"] / result["unigram_bpb"]
    meta = json.loads((ctx.run_dir / "data" / "meta.json").read_text())
    timings = [
        {"stage": "tokenizer (byte-level BPE)", "seconds": result.get("tokenizer_s", "reused")},
        {"stage": f"token shards ({meta['tokens']['train']:,} train / {meta['tokens']['val']:,} held-out tokens)",
         "seconds": result.get("shards_s", "reused")},
        {"stage": f"pre-training ({result['steps']} steps, {result['tokens_seen']:,} tokens)",
         "seconds": result["train_s"]},
        *({"stage": s.title, "seconds": round(s.seconds, 2)} for s in sections),
    ]
    lines = [
        "# athanor speedrun report",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {'cuda' if torch.cuda.is_available() else 'cpu'}. Total time {total_s / 60:.1f} min.",
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
        f"(held-out loss {result['val_loss']:.3f} nats/token). Held-out documents were chosen by a hash of "
        f"their path and never seen in training, nor by the tokenizer.",
        "",
        "## Stages and timings",
        "",
        markdown_table(timings),
        "",
        "## Loss curve",
        "",
        "![loss curve](loss.png)",
        "",
    ]
    for s in sections:
        lines += [f"## {s.title}", "", s.markdown.rstrip(), ""]
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(to_dict(ctx.recipe), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
