"""`athanor speedrun`: every stage that exists, end to end on the embedded default, with a report.

Stages so far: tokenizer -> token shards -> pre-training -> held-out evaluation -> samples.
Each later stage adds itself here and a section to `report.md`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from athanor.config import to_dict
from athanor.io import atomic_write_text
from athanor.model.hf import load_pretrained
from athanor.report import markdown_table
from athanor.serve.generate import generate
from athanor.tokenizer import Tokenizer
from athanor.train.pretrain import PretrainRecipe, pretrain

SAMPLE_PROMPTS = ["def ", "import os\n\n\nclass ", '    """Return the ']


def speedrun(recipe: PretrainRecipe, show_progress: bool = True) -> Path:
    """Run every stage and write `report.md` into `recipe.out_dir`; returns the report's path."""
    started = time.perf_counter()
    result = pretrain(recipe, show_progress=show_progress)
    out = Path(recipe.out_dir)
    model = load_pretrained(out)
    tok = Tokenizer.load(out)
    samples = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        ids = generate(model, [tok.bos_id, *tok.encode(prompt)], 96, temperature=0.8, top_k=50, seed=i,
                       stop_ids=[tok.bos_id, tok.eos_id])
        samples.append((prompt, tok.decode(ids)))
    total = time.perf_counter() - started
    report = render_report(recipe, result, samples, total)
    atomic_write_text(out / "report.md", report)
    return out / "report.md"


def render_report(recipe: PretrainRecipe, result: dict[str, Any], samples: list[tuple[str, str]],
                  total_s: float) -> str:
    ratio = result["val_bpb"] / result["unigram_bpb"]
    meta = json.loads((Path(recipe.out_dir) / "data" / "meta.json").read_text())
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
        markdown_table([
            {"stage": "tokenizer (byte-level BPE)", "seconds": result.get("tokenizer_s", "reused")},
            {"stage": f"token shards ({meta['tokens']['train']:,} train / {meta['tokens']['val']:,} "
                      f"held-out tokens)", "seconds": result.get("shards_s", "reused")},
            {"stage": f"pre-training ({result['steps']} steps, {result['tokens_seen']:,} tokens)",
             "seconds": result["train_s"]},
        ]),
        "",
        "## Loss curve",
        "",
        "![loss curve](loss.png)",
        "",
        "## Samples (temperature 0.8, top-k 50)",
        "",
    ]
    for prompt, text in samples:
        lines += ["```python", prompt + text, "```", ""]
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
