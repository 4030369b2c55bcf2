"""The speedrun end to end, every stage turned down by its size knob: the report says what it should,
the console names each stage, and a rerun's report says what it reused."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from athanor.config import load_recipe, to_dict
from athanor.errors import AthanorError
from athanor.speedrun import SpeedrunRecipe
from athanor.train.pretrain import PretrainRecipe

RECIPE = Path(__file__).parent.parent / "recipes" / "speedrun.yaml"

# Every stage's size knob, turned down (recipes/speedrun.yaml lists them with their defaults).
SMALL = ["--train.max_steps=80", "--train.eval_every=40", "--train.warmup_steps=20", "--train.eval_tokens=32768",
         "--samples.max_tokens=16", "--sft.heldout_tasks=40",
         "--preference.pair_tasks=120", "--preference.k=4", "--preference.dpo_steps=10", "--preference.rm_steps=5",
         "--preference.judge_pairs=4", "--preference.eval_samples=2",
         "--grpo.steps=3", "--grpo.prompts_per_step=4", "--grpo.num_generations=4", "--grpo.eval_samples=2",
         "--rag.questions=6",
         "--facts.entities=2", "--facts.reading_entities=3", "--facts.fact_repeats=2", "--facts.reading_repeats=1",
         "--draft.steps=30", "--draft.prompts=64", "--draft.new_tokens=32", "--draft.held_out_prompts=8",
         "--serving.max_tokens=16", "--serving.speculative_prompts=2",
         "--quant.types=Q8_0,Q4_K_M,Q4_0,Q2_K", "--quant.eval_tokens=512", "--quant.imatrix_tokens=512",
         "--quant.answer_tokens=8"]
HANG_GUARD_S = 3600  # far above any normal run: the test must never pass or fail on time


def _speedrun(out: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "athanor", "speedrun", "--out", str(out), *SMALL],
                       capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _timing_row(report: str, stage: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {stage}"))


def test_recipe_lists_every_stage_knob_with_todays_default(tmp_path: Path) -> None:
    """recipes/speedrun.yaml: pre-training's keys live (`athanor pretrain` takes the file too), each
    later stage's knobs commented out with their defaults; uncommented, the speedrun takes them."""
    load_recipe(PretrainRecipe, RECIPE, [])
    text = RECIPE.read_text()
    stages = text[text.index("\n# samples:") + 1:]
    (tmp_path / "mine.yaml").write_text(text + "".join(line[2:] + "\n" for line in stages.splitlines()))
    recipe = load_recipe(SpeedrunRecipe, tmp_path / "mine.yaml", [])
    assert to_dict(recipe) == to_dict(SpeedrunRecipe()) == to_dict(load_recipe(SpeedrunRecipe, RECIPE, []))
    assert {"samples", "sft", "preference", "draft", "serving", "quant"} <= set(to_dict(recipe))
    with pytest.raises(AthanorError, match="unknown recipe key 'draft.stepz'"):
        load_recipe(SpeedrunRecipe, None, ["--draft.stepz=5"])


@pytest.mark.slow
def test_short_speedrun_report_console_and_rerun(tmp_path: Path) -> None:
    out = tmp_path / "speedrun"
    r = _speedrun(out)
    report = (out / "report.md").read_text()
    for heading in ["## Held-out result", "## The models this run made", "## Stages and timings", "## Loss curve",
                    "## Samples", "## Post-training: SFT", "## Post-training: preference",
                    "## Post-training: RL on verifiable rewards", "## RAG: retrieval",
                    "## Facts: retrieval versus fine-tuning", "## Serving", "## Quantization", "## Settings"]:
        assert heading in report
    result = json.loads((out / "eval.json").read_text())
    assert result["val_bpb"] < 0.9 * result["unigram_bpb"]
    assert f"{result['val_bpb']:.3f}" in report and f"{result['unigram_bpb']:.3f}" in report
    assert f"measured on {result['val_tokens']:,} held-out tokens" in report and result["val_tokens"] <= 32768
    assert (out / "loss.png").stat().st_size > 10_000
    sft = json.loads((out / "sft" / "eval.json").read_text())["behavior"]  # post-training stage
    assert sft["sft"]["answer_rate"] > sft["base"]["answer_rate"] + 0.5 and sft["sft"]["tasks"] == 40

    # The newcomer's path: which directory chats, how, and every stage's loss curve.
    assert f"athanor chat {out / 'sft'}" in report and f"athanor serve {out / 'sft'}" in report
    for plot in ["sft/loss.png", "draft/loss.png"]:
        assert f"({plot})" in report and (out / plot).stat().st_size > 10_000

    # The preference stage: pairs from the SFT model and DPO on them, or a report of why there were none.
    section = report[report.index("## Post-training: preference"):report.index("## Serving")]
    if (out / "preference" / "pairs.jsonl").exists():
        pairs = (out / "preference" / "pairs.jsonl").read_text().splitlines()
        assert f"gave {len(pairs)} pairs" in section and "DPO minus SFT, paired by task" in section
        assert json.loads((out / "dpo" / "eval.json").read_text())["steps"] == 10
        assert "(dpo/loss.png)" in report and (out / "dpo" / "loss.png").stat().st_size > 10_000
        assert f"athanor overopt --policy {out / 'sft'} --rm {out / 'rm'}" in section
    else:
        assert "No pairs" in section

    # The GRPO stage: 3 batches of 4 prompts x 4 answers, every one audited, the curves drawn.
    section = report[report.index("## Post-training: RL on verifiable rewards"):report.index("## Facts")]
    grpo = json.loads((out / "grpo" / "eval.json").read_text())
    assert grpo["steps"] == 3 and grpo["heldout"]["greedy"]["tasks"] == 40
    assert len((out / "grpo" / "rollouts.jsonl").read_text().splitlines()) == 3 * 16
    assert "**Audit** of the 48 completions" in section and "(grpo/rl_curves.png)" in section
    assert "So GRPO " in section and "the greedy pass@1" in section
    assert (out / "grpo" / "rl_curves.png").stat().st_size > 10_000

    # The retrieval section: the 6 questions' files indexed, every retriever scored.
    section = report[report.index("## RAG: retrieval"):report.index("## Facts")]
    assert "6 of the shipped questions" in section and (out / "rag" / "index-hybrid" / "index.npz").is_file()
    for mode in ["bm25", "dense", "hybrid"]:
        assert re.search(rf"^\| {mode} \| 6 \| ", section, re.M), mode

    # The facts stage: 2 packages' 8 facts, each arm asked 16 paraphrases and 8 original questions.
    section = report[report.index("## Facts"):report.index("## Serving")]
    facts = json.loads((out / "facts" / "result.json").read_text())
    assert [a["paraphrased"]["n"] for a in facts["arms"]] == [16] * 6 and facts["arms"][0]["original"]["n"] == 8
    assert "| a | fine-tuned on the facts | none |" in section and "paired by question" in section

    # The knobs reached their stages.
    assert json.loads((out / "draft" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 30
    scorecard = next(out.rglob("scorecard.json"))
    assert [row["type"] for row in json.loads(scorecard.read_text())["rows"]][-4:] == \
        ["Q8_0", "Q4_K_M", "Q4_0", "Q2_K"]

    # The console: one line per stage as it starts, bars and evaluation lines named after their stage,
    # and the headline numbers at the end.
    stages = ["pre-training", "samples", "SFT", "preference", "RLVR", "RAG", "facts", "serving", "quantization"]
    for n, stage in enumerate(stages, start=1):
        assert re.search(rf"^\[{n}/{len(stages)}\] {stage}", r.stdout, re.M), r.stdout
    assert "pretrain step 40: val_loss" in r.stdout
    for bar in ["pretrain", "sft", "grpo", "draft teacher", "draft"]:
        assert re.search(rf"(^|\r){bar}: +\d+%", r.stderr, re.M), bar
    assert not re.search(r"(^|\r)train: ", r.stderr, re.M)  # no anonymous bar left
    tail = r.stdout.strip().splitlines()[-7:]
    assert tail[0].startswith(f"held-out: {result['val_bpb']:.3f} bits/byte vs {result['unigram_bpb']:.3f}")
    assert tail[1].startswith(f"SFT: answers {sft['sft']['answer_rate']:.0%}")
    assert tail[2].startswith("DPO: ")
    assert tail[3].startswith("GRPO: greedy pass@1 ") and "flagged by the audit" in tail[3]
    assert tail[4].startswith("facts never seen, paraphrased questions: fine-tuned ")
    assert tail[5].startswith("serving: ") and "tok/s" in tail[5]
    assert tail[6] == f"report: {out / 'report.md'}"
    for row in ["tokenizer", "token shards", "pre-training", "Post-training"]:
        assert "reused" not in _timing_row(report, row)

    # A rerun resumes what is done; its report says so instead of passing this run's seconds off as
    # the stages' cost.
    _speedrun(out)
    rerun = (out / "report.md").read_text()
    assert "reused: made by an earlier run" in _timing_row(rerun, "tokenizer")
    assert "reused: made by an earlier run" in _timing_row(rerun, "token shards")
    assert "an earlier run trained all 80 steps" in _timing_row(rerun, "pre-training")
    assert "an earlier run trained all 40 steps" in _timing_row(rerun, "Post-training")
    assert ", 0 embedded this run" in rerun[rerun.index("## RAG: retrieval"):]  # the index reloaded
