"""Retrieval speed and quality: athanor's index (bm25s, and the hybrid with dense vectors) vs rank-bm25.

The work, the same on both sides: index `--chunks` passages of the Python standard library (the files
the shipped questions cite first, then the other modules in path order, cut by athanor's chunker
once, before any clock starts) and answer `--queries` queries, the top 10 passages each. The queries
are the shipped questions (whose gold passages give recall@5 and MRR@10 for every side) followed by
the first lines of docstrings of the indexed code (for volume; they have no gold).

Both BM25 sides get the same terms: athanor's tokenizer (identifiers whole and split, lower case,
English stop words out), timed inside each side's clock. rank-bm25 (`BM25Okapi`, its defaults
k1 1.5, b 0.75) is used as its README shows: `BM25Okapi(tokenized_corpus)`, then `get_top_n` per
query. athanor's BM25 is bm25s's Lucene variant (same k1, b); the two idf formulas differ slightly,
so their rankings may differ: the recall columns say whether that costs anything. The hybrid row adds
all-MiniLM-L6-v2 embeddings of every passage and query (the bulk of its time) and the rank fusion.

"index" is building the index from the passages; "queries" is all the queries; the speed-up is the
baseline's total over the side's total. Each BM25 side runs `--rounds` times in this process (medians);
the hybrid side `--dense-rounds` times (once by default: embedding ten thousand passages takes minutes).

    python benchmarks/rag.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time

import torch

from athanor.rag.chunking import Chunk, chunk_document
from athanor.rag.evaluate import (
    MRR_DEPTH,
    SHIPPED_QUESTIONS,
    Question,
    first_relevant,
    is_relevant,
    read_questions,
    shipped_sources,
    stdlib_dir,
)
from athanor.rag.index import Hit, RagIndex
from athanor.rag.terms import terms

DEPTH = 10


def corpus(questions: list[Question], n_chunks: int) -> list[Chunk]:
    """The question files' passages, then other stdlib modules' (tests left out), to `n_chunks`."""
    first = shipped_sources(questions)
    rest = sorted(p for p in stdlib_dir().rglob("*.py")
                  if not {"test", "tests", "idlelib", "site-packages"} & set(p.relative_to(stdlib_dir()).parts))
    chunks: list[Chunk] = []
    for path in first + [p for p in rest if p not in set(first)]:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunks += chunk_document(str(path), text)
        if len(chunks) >= n_chunks:
            break
    return chunks[:n_chunks]


def docstring_queries(chunks: list[Chunk], n: int) -> list[str]:
    """First lines of function and class docstrings found in the passages, in order."""
    out: list[str] = []
    for c in chunks:
        try:
            tree = ast.parse(c.text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and (doc := ast.get_docstring(node)):
                out.append(doc.strip().splitlines()[0])
                if len(out) >= n:
                    return out
    return out


def scores(rankings: list[list[Chunk]], questions: list[Question]) -> tuple[float, float, float]:
    """recall@5, recall@10 and MRR@10 of the questions' rankings."""
    ranks = [first_relevant([Hit(c, 0.0, r) for r, c in enumerate(row, 1)], q)
             for row, q in zip(rankings, questions, strict=False)]
    recall5, recall10 = (sum(r is not None and r <= k for r in ranks) / len(questions) for k in (5, 10))
    mrr = sum(1.0 / r for r in ranks if r is not None and r <= MRR_DEPTH) / len(questions)
    return recall5, recall10, mrr


def run_athanor(chunks: list[Chunk], queries: list[str], mode: str, embedder=None) -> tuple[float, float, list]:
    t0 = time.perf_counter()
    index = RagIndex(embedder)
    index.add_chunks(chunks)
    index.prepare()
    t1 = time.perf_counter()
    hits = index.search_many(queries, DEPTH, mode)  # type: ignore[arg-type]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [[h.chunk for h in row] for row in hits]


def run_rank_bm25(chunks: list[Chunk], queries: list[str]) -> tuple[float, float, list]:
    from rank_bm25 import BM25Okapi

    t0 = time.perf_counter()
    bm25 = BM25Okapi([terms(c.text) or ["\x00"] for c in chunks])
    t1 = time.perf_counter()
    ids = list(range(len(chunks)))
    tops = [bm25.get_top_n(terms(q), ids, n=DEPTH) for q in queries]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [[chunks[i] for i in row] for row in tops]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dense-rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-dense", action="store_true", help="skip the hybrid row (no embedding model)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    questions = read_questions(SHIPPED_QUESTIONS)
    chunks = corpus(questions, args.chunks)
    queries = [q.question for q in questions]
    queries += docstring_queries(chunks, args.queries - len(queries))
    reachable = sum(any(is_relevant(c, q) for c in chunks) for q in questions)
    print(f"{len(chunks)} passages, {len(queries)} queries ({len(questions)} with gold passages, {reachable} "
          f"of them reachable), top {DEPTH}, {args.threads} threads, medians of {args.rounds} rounds "
          f"({args.dense_rounds} for the hybrid)\n")

    sides: dict[str, object] = {"rank-bm25 BM25Okapi": lambda: run_rank_bm25(chunks, queries),
                                "athanor bm25 (bm25s)": lambda: run_athanor(chunks, queries, "bm25")}
    if not args.no_dense:
        from athanor.rag.embed import load_embedder

        embedder = load_embedder()
        sides["athanor hybrid (bm25s + MiniLM, RRF)"] = lambda: run_athanor(chunks, queries, "hybrid", embedder)
    rows = []
    for name, run in sides.items():
        rounds = args.dense_rounds if "hybrid" in name else args.rounds
        times = [run() for _ in range(rounds)]  # type: ignore[operator]
        index_s = statistics.median(t[0] for t in times)
        query_s = statistics.median(t[1] for t in times)
        rows.append((name, index_s, query_s, *scores(times[0][2][: len(questions)], questions)))
    base_total = rows[0][1] + rows[0][2]
    print("| side | index s | queries s | total s | speed-up | recall@5 | recall@10 | MRR@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, index_s, query_s, recall5, recall10, mrr in rows:
        total = index_s + query_s
        print(f"| {name} | {index_s:.2f} | {query_s:.2f} | {total:.2f} | {base_total / total:.1f}x | "
              f"{recall5:.3f} | {recall10:.3f} | {mrr:.3f} |")


if __name__ == "__main__":
    main()
