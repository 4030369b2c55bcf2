"""Facts: retrieval versus fine-tuning, measured on facts the model never saw (data/facts.py).

Every arm starts from the same chat model (the speedrun's SFT model) and answers the same questions
about the evaluated facts, greedy, through the engine; an answer is right when its first line matches
the fact's value after SQuAD's normalization (rag/evaluate.py). Two kinds of question per fact: the
*original phrasing* (the wording fine-tuning trains on) and two *paraphrases* (in no training text of
any arm). The arms:

- **(0) the SFT model, no passages**: the floor; the values are random, so near zero.
- **(0r) the SFT model with retrieved passages**: RAG on a model never taught to read them.
- **(a) fine-tuned on the facts** (full or LoRA, the project's SFT): for each fact its original
  question with the answer, and for each package a page of its statements ("Tell me about X.").
- **(b) taught to read, with retrieved passages**: the SFT model fine-tuned on the read-from-passages
  format with the facts of *other* packages (a disjoint set), each training question in its original
  phrasing with the top-k passages retrieved for it (the right one among them, the order shuffled so
  that its position tells nothing), the answer its value. It never sees an evaluated fact in training.
- **(c) both, with retrieved passages**: one fine-tune on (a)'s and (b)'s data together, so "both"
  here includes teaching the reading format; it answers with the same retrieved passages as (b).
- **(c0) that model without passages**: whether (c) lost the facts, or reads rather than recalls
  when passages are there.

Retrieval: every fact's statement is its own passage in a `RagIndex`; the top k for each question,
hybrid (BM25 and all-MiniLM-L6-v2, fused) when the embedding model is installed, else BM25.

Training length is counted in passes, not steps: each model trains one pass over its packed rows (steps
= rows / batch size, rounded up), in which every fact text appears `fact_repeats` times and every
reading example `reading_repeats` times (memorizing a value takes many passes, learning a format many
examples), so (c) sees each example exactly as often as (a) or (b) did.

Rates come with their counts and Wilson 95% intervals; the comparisons in the text are paired (the
same questions for two arms) with a 95% interval over questions, and a difference is called one only
where that interval excludes 0.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from athanor.data.facts import Fact, make_fact_sets
from athanor.data.formats import load_examples
from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.lm.local import LocalLM
from athanor.rag.answer import answer_questions, rag_prompt
from athanor.rag.embed import Embedder, embedder_installed, load_embedder
from athanor.rag.evaluate import exact_match
from athanor.rag.index import Hit, Mode, RagIndex
from athanor.report import markdown_table, resume_note
from athanor.stage import Context, Section
from athanor.stats import paired_diff_text, paired_verdict, wilson_interval
from athanor.tokenizer import Tokenizer
from athanor.train.finetune import LoraSettings
from athanor.train.loop import TrainConfig
from athanor.train.sft import SFTDataConfig, SFTRecipe, encode_examples, pack, sft

TITLE = "Facts: retrieval versus fine-tuning"
# A paired difference's verdict (stats.paired_verdict) as a comparison of two arms.
COMPARED = {"raised": "scores higher than", "lowered": "scores lower than",
            "did not measurably change": "is not measurably different from", "did not change": "scores the same as"}
PHRASINGS = ("paraphrased", "original")


@dataclass
class FactsRecipe:
    """`athanor facts`: the experiment's sizes and the fine-tunes' settings (recipes/rag-facts.yaml)."""

    out_dir: str = "runs/rag-facts"
    base: str = "runs/speedrun/sft"  # the chat model every arm starts from
    entities: int = 60  # evaluated packages, 4 facts each
    reading_entities: int = 120  # other packages, whose facts teach the reading format
    seed: int = 0
    k: int = 3  # passages retrieved per question
    retrieval: Literal["auto", "hybrid", "bm25", "dense"] = "auto"  # auto: hybrid when the embedding model is
    # installed, else BM25
    fact_repeats: int = 30  # copies of each fact text in (a)'s and (c)'s one pass
    reading_repeats: int = 2  # copies of each reading example in (b)'s and (c)'s one pass
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    device: str = "auto"
    max_new_tokens: int = 16  # answer budget (the values are a few tokens)
    lora: LoraSettings = field(default_factory=LoraSettings)


# -- data ----------------------------------------------------------------------------------------
def _chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def finetune_records(facts: list[Fact]) -> list[dict[str, Any]]:
    """(a)'s texts: each fact's original question and answer, and each package's page of statements."""
    pages: dict[str, list[str]] = {}
    for f in facts:
        pages.setdefault(f.entity, []).append(f.statement)
    return ([_chat(f.question, f.answer) for f in facts]
            + [_chat(f"Tell me about {entity}.", " ".join(lines)) for entity, lines in pages.items()])


def passage_source(i: int) -> str:
    """A passage's name in the index (what `rag_prompt` shows above it): neutral, so only its text informs."""
    return f"fact-{i:04d}"


def build_index(facts: list[Fact], embedder: Embedder | None) -> RagIndex:
    index = RagIndex(embedder)
    index.add_documents((passage_source(i), f.statement) for i, f in enumerate(facts))
    return index


def _is_gold(hit: Hit, fact: Fact) -> bool:
    return hit.chunk.text == fact.statement


def reading_records(facts: list[Fact], index: RagIndex, k: int, mode: Mode, seed: int) -> tuple[list[dict], int]:
    """(b)'s examples: each fact's original question with its top-k retrieved passages in shuffled order,
    answered with the value; returns them and how many facts were left out because retrieval missed
    the right passage (an example whose answer is nowhere in the passages would teach guessing)."""
    rng = random.Random(seed)
    records, missed = [], 0
    for f, hits in zip(facts, index.search_many([f.question for f in facts], k, mode), strict=True):
        if not any(_is_gold(h, f) for h in hits):
            missed += 1
            continue
        rng.shuffle(hits)
        records.append(_chat(rag_prompt(f.question, hits), f.answer))
    return records, missed


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# -- training ------------------------------------------------------------------------------------
def _train(recipe: FactsRecipe, name: str, paths: list[str], show_progress: bool) -> dict[str, Any]:
    """One fine-tune of `recipe.base` on `paths`: one pass over their packed rows, via the SFT stage."""
    tok = Tokenizer.load(recipe.base)
    rows = pack(encode_examples([ex for p in paths for ex in load_examples(p)], tok, recipe.seq_len),
                recipe.seq_len, tok.pad_id, recipe.seed)
    steps = max(1, math.ceil(len(rows["x"]) / recipe.batch_size))
    sft_recipe = SFTRecipe(
        out_dir=str(Path(recipe.out_dir) / name), base=recipe.base, data=SFTDataConfig(paths=paths),
        lora=recipe.lora,
        train=TrainConfig(max_steps=steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len, lr=recipe.lr,
                          warmup_steps=min(10, steps // 10), weight_decay=0.0, eval_every=0, eval_tokens=0,
                          ckpt_every=0, log_every=10, device=recipe.device, seed=recipe.seed))
    return {**sft(sft_recipe, show_progress=show_progress), "dir": sft_recipe.out_dir}


# -- evaluation ----------------------------------------------------------------------------------
@dataclass
class Arm:
    key: str
    model: str  # what the row's model is
    passages: str  # what it is shown
    model_dir: str
    retrieval: bool


def _questions(facts: list[Fact]) -> dict[str, list[tuple[int, str]]]:
    """(fact index, question) for each phrasing."""
    return {"paraphrased": [(i, p) for i, f in enumerate(facts) for p in f.paraphrases],
            "original": [(i, f.question) for i, f in enumerate(facts)]}


def _answer(arm: Arm, facts: list[Fact], questions: dict[str, list[tuple[int, str]]],
            hits: dict[str, list[list[Hit]]], max_new_tokens: int, device: str) -> dict[str, list[dict[str, Any]]]:
    lm = LocalLM.load(arm.model_dir, device=None if device == "auto" else device)
    out = {}
    for phrasing, asked in questions.items():
        passages = hits[phrasing] if arm.retrieval else [[] for _ in asked]
        answers = answer_questions(lm, [q for _, q in asked], passages, max_new_tokens)
        # The first line is the answer; a small model may ramble on after it.
        out[phrasing] = [{"fact": facts[i].id, "question": q, "answer": facts[i].answer,
                          "reply": a.text, "correct": bool(exact_match(a.text.split("\n", 1)[0], facts[i].answer))}
                         for (i, q), a in zip(asked, answers, strict=True)]
    return out


def _rate(correct: list[bool]) -> dict[str, Any]:
    n, right = len(correct), sum(correct)
    low, high = wilson_interval(right, n)
    return {"correct": right, "n": n, "rate": right / n, "low": low, "high": high}


def facts_experiment(recipe: FactsRecipe, show_progress: bool = True) -> dict[str, Any]:
    """Generate the facts, fine-tune the three models, answer every question in every arm; returns (and
    writes to result.json, every answer to answers.jsonl) the rates and paired differences."""
    if recipe.entities < 1 or recipe.reading_entities < 1:
        raise AthanorError("the experiment needs at least one evaluated and one reading package", field="entities")
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    facts, reading = make_fact_sets(recipe.entities, recipe.reading_entities, recipe.seed)
    _write_jsonl(out / "facts.jsonl", [{"id": f.id, "statement": f.statement, "question": f.question,
                                        "paraphrases": list(f.paraphrases), "answer": f.answer} for f in facts])
    embedder = None if recipe.retrieval == "bm25" else _embedder(recipe.retrieval)
    mode: Mode = recipe.retrieval if recipe.retrieval != "auto" else "hybrid" if embedder else "bm25"
    index, reading_index = build_index(facts, embedder), build_index(reading, embedder)
    reading_recs, missed = reading_records(reading, reading_index, recipe.k, mode, recipe.seed)
    data = out / "data"
    finetune_file = _write_jsonl(data / "finetune.jsonl", finetune_records(facts) * recipe.fact_repeats)
    reading_file = _write_jsonl(data / "reading.jsonl", reading_recs * recipe.reading_repeats)
    questions = _questions(facts)
    hits = {ph: index.search_many([q for _, q in asked], recipe.k, mode) for ph, asked in questions.items()}
    recall = {ph: _rate([any(_is_gold(h, facts[i]) for h in row) for (i, _), row in zip(asked, hits[ph],
                                                                                        strict=True)])
              for ph, asked in questions.items()}
    timings["data_s"] = time.perf_counter() - t

    trained = {}
    for name, paths in (("finetuned", [finetune_file]), ("reader", [reading_file]),
                        ("both", [finetune_file, reading_file])):
        t = time.perf_counter()
        trained[name] = _train(recipe, name, paths, show_progress)
        timings[f"train_{name}_s"] = time.perf_counter() - t
    arms = [Arm("0", "SFT model", "none", recipe.base, False),
            Arm("0r", "SFT model", f"top-{recipe.k} retrieved", recipe.base, True),
            Arm("a", "fine-tuned on the facts", "none", trained["finetuned"]["dir"], False),
            Arm("b", "taught to read (other facts)", f"top-{recipe.k} retrieved", trained["reader"]["dir"], True),
            Arm("c", "fine-tuned on the facts + taught to read", f"top-{recipe.k} retrieved",
                trained["both"]["dir"], True),
            Arm("c0", "fine-tuned on the facts + taught to read", "none", trained["both"]["dir"], False)]
    t = time.perf_counter()
    answers = {arm.key: _answer(arm, facts, questions, hits, recipe.max_new_tokens, recipe.device) for arm in arms}
    timings["eval_s"] = time.perf_counter() - t
    _write_jsonl(out / "answers.jsonl", [{"arm": key, "phrasing": ph, **row} for key, by in answers.items()
                                         for ph, rows in by.items() for row in rows])
    result = {
        "facts": len(facts), "reading_facts": len(reading), "reading_examples": len(reading_recs),
        "reading_missed": missed, "retrieval": mode, "k": recipe.k,
        "recall": recall,
        "arms": [{"key": arm.key, "model": arm.model, "passages": arm.passages,
                  **{ph: _rate([r["correct"] for r in answers[arm.key][ph]]) for ph in PHRASINGS}} for arm in arms],
        "correct": {key: {ph: [r["correct"] for r in rows] for ph, rows in by.items()} for key, by in answers.items()},
        "training": {name: {"steps": r["steps"], "examples": r["train_examples"], "packed_rows": r["packed_rows"],
                            "resumed_from_step": r["resumed_from_step"]} for name, r in trained.items()},
        **{k: round(v, 2) for k, v in timings.items()},
    }
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def _embedder(retrieval: str) -> Embedder | None:
    """The embedding model; under "auto" its absence means BM25 alone, not an error."""
    return load_embedder() if retrieval != "auto" or embedder_installed() else None


# -- the report ----------------------------------------------------------------------------------
def _cell(r: dict[str, Any]) -> str:
    return f"{r['correct']}/{r['n']} = {r['rate']:.0%} [{r['low']:.0%}, {r['high']:.0%}]"


def table(result: dict[str, Any]) -> str:
    return markdown_table([{"arm": a["key"], "model": a["model"], "passages in the prompt": a["passages"],
                            "paraphrased questions (95% interval)": _cell(a["paraphrased"]),
                            "original phrasing (95% interval)": _cell(a["original"])} for a in result["arms"]])


def _diff(result: dict[str, Any], phrasing: str, after: str, before: str) -> tuple[str, str]:
    """(verdict, difference in points with its interval) of arm `after` minus arm `before`, paired by question."""
    a, b = result["correct"][after][phrasing], result["correct"][before][phrasing]
    values = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    return paired_verdict(values), paired_diff_text(values)


def _per_fact_gap(result: dict[str, Any], arm: str) -> tuple[str, str]:
    """Paraphrased minus original accuracy of one arm, paired by fact (each fact's paraphrases averaged)."""
    para, orig = result["correct"][arm]["paraphrased"], result["correct"][arm]["original"]
    per = len(para) // len(orig)
    values = [sum(para[i * per:(i + 1) * per]) / per - float(o) for i, o in enumerate(orig)]
    return paired_verdict(values), paired_diff_text(values)


def reading(result: dict[str, Any]) -> str:
    """What the table shows, in words from its numbers: a difference only where its interval excludes 0."""
    arm = {a["key"]: a for a in result["arms"]}

    def rates(key: str) -> str:
        return f"{arm[key]['paraphrased']['rate']:.0%} of the paraphrases and {arm[key]['original']['rate']:.0%} " \
               "of the original questions"

    def versus(phrasing: str, after: str, before: str) -> str:
        verdict, text = _diff(result, phrasing, after, before)
        return f"{text}: ({after}) {COMPARED[verdict]} ({before})"

    gap_verdict, gap = _per_fact_gap(result, "a")
    rec = result["recall"]
    return " ".join([
        f"Fine-tuning on the facts (a) answers {rates('a')}; paraphrased minus original, paired by fact: {gap}, "
        f"so rewording the question {gap_verdict} its accuracy.",
        f"A model taught to read, given the retrieved passages (b), answers {rates('b')}; against fine-tuning on "
        f"the paraphrases, paired by question: {versus('paraphrased', 'b', 'a')}.",
        f"The untaught SFT model given the same passages (0r) answers {rates('0r')}; teaching the format: "
        f"{versus('paraphrased', 'b', '0r')}.",
        f"Both (c) answers {rates('c')}; against retrieval alone: {versus('paraphrased', 'c', 'b')}; against "
        f"fine-tuning alone: {versus('paraphrased', 'c', 'a')}, and on the original wording "
        f"{versus('original', 'c', 'a')}.",
        f"The same model without passages (c0) answers {rates('c0')}; with them against without, on the original "
        f"wording: {versus('original', 'c', 'c0')}.",
        f"The retriever ({result['retrieval']}, top {result['k']}) put the right passage in the prompt for "
        f"{_cell(rec['paraphrased'])} of the paraphrases and {_cell(rec['original'])} of the original questions: "
        "the ceiling of any arm that reads.",
    ])


# -- the speedrun's stage ------------------------------------------------------------------------
@dataclass
class SpeedrunFacts:
    """The speedrun's facts stage: `--facts.KEY=VALUE` on `athanor speedrun`."""

    entities: int = 15  # evaluated packages (4 facts, 8 paraphrased and 4 original questions each)
    reading_entities: int = 40  # packages whose facts teach the reading format
    fact_repeats: int = 30
    reading_repeats: int = 2
    k: int = 3


def speedrun_stage(ctx: Context) -> Section:
    knobs: SpeedrunFacts = ctx.recipe.facts
    recipe = FactsRecipe(out_dir=str(ctx.run_dir / "facts"), base=ctx.results["sft"]["run_dir"],
                         entities=knobs.entities, reading_entities=knobs.reading_entities,
                         fact_repeats=knobs.fact_repeats, reading_repeats=knobs.reading_repeats, k=knobs.k,
                         device=ctx.recipe.train.device)
    ctx.say(f"{knobs.entities * 4} facts about made-up packages: fine-tune on them, retrieve them, both; "
            "questions in the original phrasing and paraphrased")
    result = facts_experiment(recipe, show_progress=ctx.show_progress)
    rate = {a["key"]: a["paraphrased"]["rate"] for a in result["arms"]}
    ctx.results["facts"] = {"paraphrased": rate, "n": result["arms"][0]["paraphrased"]["n"]}
    trained = result["training"].values()
    return Section(TITLE, markdown(recipe, result), note=resume_note(sum(t["resumed_from_step"] for t in trained),
                                                                     sum(t["steps"] for t in trained)))


def markdown(recipe: FactsRecipe, result: dict[str, Any]) -> str:
    tr = result["training"]
    return "\n".join([
        f"{result['facts']} facts (port, author, first-release year, default timeout) about "
        f"{result['facts'] // 4} made-up packages that no corpus mentions; each asked in its original phrasing "
        "and in two paraphrases that no arm trains on. Every arm starts from the SFT model and answers greedily; "
        "right = the first line matches the value (case and punctuation aside). (a) trains on each fact's "
        f"original question and answer and a page of statements per package, each {recipe.fact_repeats} times "
        f"({tr['finetuned']['steps']} steps); (b) is taught to answer from passages with "
        f"{result['reading_examples']} questions about {result['reading_facts'] // 4} *other* packages, each "
        f"with its top {result['k']} passages shuffled ({tr['reader']['steps']} steps); (c) trains on both "
        f"({tr['both']['steps']} steps), so its \"fine-tune\" includes the reading format. The passages are the "
        f"facts' statements, retrieved by {result['retrieval']} search.",
        "",
        table(result),
        "",
        reading(result),
        "",
        f"Every answer: `{Path(recipe.out_dir) / 'answers.jsonl'}`. The bigger version (more facts, more "
        f"passes): `athanor facts --recipe recipes/rag-facts.yaml --base {recipe.base}`.",
    ])
