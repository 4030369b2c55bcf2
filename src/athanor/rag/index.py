"""The index: passages of many documents, a BM25 index and dense vectors over them, on disk.

Two retrievers see different things. BM25 (Robertson & Zaragoza's ranking, via bm25s) rewards the
rare words a query shares with a passage, exact names included; the dense encoder matches meaning
when the words differ. Hybrid search fuses their rankings by reciprocal rank (Cormack, Clarke &
Büttcher 2009): a passage scores the sum over retrievers of 1 / (60 + its rank there), which needs
no calibration between their unlike scores.

On disk (a directory): `index.npz`, one file written atomically (temp file + rename), holding the
passages, their vectors, the files they came from (size, mtime, SHA-1) and the settings. Loading
reads the vectors back: nothing is re-embedded. Updating re-reads only files whose size or mtime
changed, re-chunks those whose content changed, and embeds only passages whose text is new; a
removed file's passages go. BM25 statistics depend on every passage, so that index is rebuilt on
load and after changes (a fraction of a second for ten thousand passages).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from athanor.errors import AthanorError
from athanor.io import atomic_write
from athanor.rag.chunking import Chunk, chunk_document
from athanor.rag.embed import Embedder, load_embedder
from athanor.rag.terms import terms

Mode = Literal["hybrid", "bm25", "dense"]
MODES: tuple[str, ...] = ("hybrid", "bm25", "dense")
RRF_K = 60  # the constant of reciprocal-rank fusion, as Cormack et al. set it
FUSION_DEPTH = 100  # how deep each retriever's ranking goes into the fusion
FORMAT_VERSION = 1
INDEX_FILE = "index.npz"
TEXT_SUFFIXES = {".py", ".md", ".txt", ".rst", ".text", ".toml", ".yaml", ".yml", ".json", ".jsonl", ".cfg",
                 ".ini", ".sh", ".html", ".c", ".h", ".js", ".ts"}


@dataclass
class Hit:
    chunk: Chunk
    score: float  # BM25 score, cosine similarity, or fused reciprocal-rank score, by mode
    rank: int  # 1-based


@dataclass
class UpdateReport:
    added: int = 0  # files new to the index
    changed: int = 0  # files whose content changed
    removed: int = 0  # files gone since the last update
    unchanged: int = 0
    skipped: list[str] | None = None  # files found in a directory that are not UTF-8 text
    embedded: int = 0  # passages encoded this time (the others' vectors were reused)
    chunks: int = 0  # passages in the index after the update


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties by index, so results are reproducible)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


class RagIndex:
    """Passages with BM25 and (when an embedder is given) dense retrieval over them."""

    def __init__(self, embedder: Embedder | None = None, max_tokens: int = 200, overlap: int = 40) -> None:
        self.embedder = embedder
        self.max_tokens, self.overlap = max_tokens, overlap
        self.chunks: list[Chunk] = []
        self.vectors = np.zeros((0, embedder.dim if embedder else 0), np.float32)
        self.files: dict[str, dict[str, Any]] = {}  # path -> {"size", "mtime_ns", "sha1"}
        self.roots: list[str] = []  # the paths `update_paths` was given: what a re-run re-scans
        self._bm25: Any = None

    # -- building ---------------------------------------------------------------------------------
    def add_documents(self, docs: Iterable[tuple[str, str]], show_progress: bool = False) -> int:
        """Add (source, text) documents, replacing any passages a source already had; returns how many
        passages were embedded (passages whose text the index already had reuse their vectors)."""
        docs = list(docs)
        chunks = [c for source, text in docs for c in chunk_document(source, text, self.max_tokens, self.overlap)]
        return self.add_chunks(chunks, {source for source, _ in docs}, show_progress)

    def add_chunks(self, chunks: Sequence[Chunk], replace: Iterable[str] = (), show_progress: bool = False) -> int:
        """Add passages cut elsewhere, after removing those of the sources in `replace`; returns how many
        passages were embedded."""
        replaced = set(replace)
        old = [i for i, c in enumerate(self.chunks) if c.source in replaced]
        reuse = {_sha1(self.chunks[i].text): self.vectors[i] for i in old} if self.embedder else {}
        keep = [i for i, c in enumerate(self.chunks) if c.source not in replaced]
        new = list(chunks)
        embedded = 0
        if self.embedder:
            hashes = [_sha1(c.text) for c in new]
            todo = list(dict.fromkeys(h for h in hashes if h not in reuse))
            by_hash = {c_hash: c.text for c_hash, c in zip(hashes, new, strict=True)}
            if todo:
                fresh = self.embedder.encode([by_hash[h] for h in todo], show_progress=show_progress)
                reuse.update(zip(todo, fresh, strict=True))
            embedded = len(todo)
            new_vectors = np.stack([reuse[h] for h in hashes]) if new else np.zeros((0, self.embedder.dim),
                                                                                    np.float32)
            self.vectors = np.concatenate([self.vectors[keep], new_vectors]).astype(np.float32)
        self.chunks = [self.chunks[i] for i in keep] + new
        self._bm25 = None
        return embedded

    def add(self, source: str, text: str) -> int:
        """Add one document (replacing the source's passages); returns the passages it now has."""
        self.add_documents([(source, text)])
        return sum(c.source == source for c in self.chunks)

    def remove(self, sources: Iterable[str]) -> None:
        gone = set(sources)
        keep = [i for i, c in enumerate(self.chunks) if c.source not in gone]
        self.chunks = [self.chunks[i] for i in keep]
        if self.embedder:
            self.vectors = self.vectors[keep]
        for s in gone:
            self.files.pop(s, None)
        self._bm25 = None

    def update_paths(self, paths: Sequence[str | Path] | None = None, show_progress: bool = False) -> UpdateReport:
        """Bring the index in line with the files under `paths` (default: the paths of the last update):
        new and changed files are (re)indexed, files no longer there are removed."""
        if paths:
            self.roots = [str(Path(p).resolve()) for p in paths]
        if not self.roots:
            raise AthanorError("no files to index: give files or directories")
        report = UpdateReport(skipped=[])
        found: dict[str, Path] = {}
        for root in self.roots:
            for f in _walk(Path(root)):
                found[str(f)] = f
        docs: list[tuple[str, str]] = []
        for name, f in found.items():
            st = f.stat()
            seen = self.files.get(name)
            if seen and seen["size"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns:
                report.unchanged += 1
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                if any(name == str(Path(r)) for r in self.roots):  # named explicitly: the user meant it
                    raise AthanorError("not UTF-8 text: cannot index it", path=f) from None
                report.skipped.append(name)
                continue
            except OSError as e:
                raise AthanorError(f"cannot read it ({e.strerror})", path=f) from None
            digest = _sha1(text)
            self.files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": digest}
            if seen and seen["sha1"] == digest:
                report.unchanged += 1  # touched, same content
                continue
            report.changed += bool(seen)
            report.added += not seen
            docs.append((name, text))
        gone = [name for name in self.files if name not in found]
        self.remove(gone)
        report.removed = len(gone)
        report.embedded = self.add_documents(docs, show_progress=show_progress)
        report.chunks = len(self.chunks)
        return report

    # -- searching --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Build the BM25 index now (a search builds it when the passages changed since the last one)."""
        if self.chunks:
            self._bm25_index()

    def _bm25_index(self) -> Any:
        if self._bm25 is None:
            import bm25s

            self._bm25 = bm25s.BM25()
            # An empty passage still needs a term: bm25s cannot index an empty token list.
            self._bm25.index([terms(c.text) or ["\x00"] for c in self.chunks], show_progress=False)
        return self._bm25

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise AthanorError(f"unknown retrieval mode {mode!r}; choose from {', '.join(MODES)}")
        if mode != "bm25" and self.embedder is None:
            raise AthanorError(f"{mode} retrieval needs dense vectors, and this index has none "
                               "(it was built without an embedding model): use mode 'bm25'")

    def bm25_rankings(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        """Each query's top passages by BM25, (passage index, score), best first; passages sharing no
        term with the query are left out."""
        if not self.chunks:
            return [[] for _ in queries]
        bm25 = self._bm25_index()
        depth = min(depth, len(self.chunks))
        query_terms = [[t for t in terms(q) if t in bm25.vocab_dict] for q in queries]
        asked = [i for i, t in enumerate(query_terms) if t]  # a query with no indexed term matches nothing
        rankings: list[list[tuple[int, float]]] = [[] for _ in queries]
        if asked:
            ids, scores = bm25.retrieve([query_terms[i] for i in asked], k=depth, show_progress=False)
            for i, row_ids, row_scores in zip(asked, ids, scores, strict=True):
                rankings[i] = [(int(d), float(s)) for d, s in zip(row_ids, row_scores, strict=True) if s > 0]
        return rankings

    def dense_rankings(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        """Each query's top passages by cosine similarity, best first."""
        if not self.chunks:
            return [[] for _ in queries]
        assert self.embedder is not None
        sims = self.embedder.encode(list(queries)) @ self.vectors.T
        return [[(int(i), float(row[i])) for i in _top(row, depth)] for row in sims]

    def search_many(self, queries: Sequence[str], k: int = 5, mode: Mode = "hybrid") -> list[list[Hit]]:
        """The top `k` passages for each query."""
        self._check_mode(mode)
        if mode == "bm25":
            ranked = self.bm25_rankings(queries, k)
        elif mode == "dense":
            ranked = self.dense_rankings(queries, k)
        else:
            ranked = [_fuse(a, b, k) for a, b in zip(self.bm25_rankings(queries, FUSION_DEPTH),
                                                     self.dense_rankings(queries, FUSION_DEPTH), strict=True)]
        return [[Hit(self.chunks[i], score, r) for r, (i, score) in enumerate(row, 1)] for row in ranked]

    def search(self, query: str, k: int = 5, mode: Mode = "hybrid") -> list[Hit]:
        return self.search_many([query], k, mode)[0]

    # -- disk -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "embedder": self.embedder.name if self.embedder else None,
                "dim": int(self.vectors.shape[1]), "max_tokens": self.max_tokens, "overlap": self.overlap,
                "roots": self.roots, "files": self.files}
        chunks = "\n".join(json.dumps(asdict(c)) for c in self.chunks)
        path = directory / INDEX_FILE
        atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), chunks=np.array(chunks),
                                              vectors=self.vectors))
        return path

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder | None | Literal["auto"] = "auto") -> RagIndex:
        """Read an index back. `embedder` "auto" loads the model the index was built with; an explicit one
        must be that model (vectors of two models are not comparable)."""
        path = Path(directory) / INDEX_FILE
        if not path.is_file():
            raise AthanorError("no index here (run `athanor rag index` first)", path=directory)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                chunk_lines = str(data["chunks"]).splitlines()
                vectors = np.asarray(data["vectors"], np.float32)
            chunks = [Chunk(**json.loads(line)) for line in chunk_lines]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AthanorError(f"not a readable athanor index ({e})", path=path) from None
        if meta.get("format") != FORMAT_VERSION:
            raise AthanorError(f"index format {meta.get('format')}, this athanor reads {FORMAT_VERSION}", path=path)
        built_with = meta["embedder"]
        if embedder == "auto":
            embedder = load_embedder(built_with) if built_with else None
        name = embedder.name if embedder else None
        if built_with and name != built_with:
            raise AthanorError(f"the index was embedded with {built_with!r}, not {name!r}: its vectors are not "
                               "comparable; re-index with that model or build a new index", path=path)
        if embedder and not built_with:
            raise AthanorError("the index was built without dense vectors; re-index with an embedding model",
                               path=path)
        if embedder and (vectors.shape != (len(chunks), embedder.dim)):
            raise AthanorError(f"vectors of shape {vectors.shape} for {len(chunks)} passages of a "
                               f"{embedder.dim}-dimensional model: a damaged index", path=path)
        index = cls(embedder, meta["max_tokens"], meta["overlap"])
        index.chunks, index.files, index.roots = chunks, meta["files"], meta["roots"]
        if embedder:
            index.vectors = vectors
        return index


def open_index(directory: str | Path, dense: bool = True, max_tokens: int = 200, overlap: int = 40) -> RagIndex:
    """The index in `directory`, or a new empty one with these settings. An existing index keeps its own
    settings; asking for different ones is an error (its passages would mix two chunkings)."""
    if (Path(directory) / INDEX_FILE).is_file():
        index = RagIndex.load(directory)
        wanted = {"dense vectors": dense, "chunk tokens": max_tokens, "overlap": overlap}
        has = {"dense vectors": index.embedder is not None, "chunk tokens": index.max_tokens,
               "overlap": index.overlap}
        differ = [f"{k} {has[k]} (asked {wanted[k]})" for k in wanted if wanted[k] != has[k]]
        if differ:
            raise AthanorError(f"the index was built with {', '.join(differ)}: build a new index in another "
                               "directory to change them", path=directory)
        return index
    return RagIndex(load_embedder() if dense else None, max_tokens, overlap)


def _fuse(a: list[tuple[int, float]], b: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of two rankings; ties broken by passage index."""
    fused: dict[int, float] = {}
    for ranking in (a, b):
        for rank, (i, _) in enumerate(ranking, 1):
            fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]


def _walk(root: Path) -> Iterable[Path]:
    """The text files under `root` (itself, if a file), hidden directories and caches left out."""
    if root.is_file():
        yield root.resolve()
        return
    if not root.is_dir():
        raise AthanorError("no such file or directory", path=root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if Path(name).suffix in TEXT_SUFFIXES and not name.startswith("."):
                yield (Path(dirpath) / name).resolve()
