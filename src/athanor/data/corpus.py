"""Where pre-training text comes from: the embedded default, or the user's files.

The embedded default is the Python standard library of the running interpreter (tests left
out): always present, offline, and large enough (about 12 MB of code) to train a small code
model. Any corpus is split into train and held-out by a stable hash of each document's id
(a path, or path:line for JSONL rows), so the split never changes between runs or machines.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.errors import AthanorError
from athanor.io import jsonl_objects

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ""}
TEST_DIRS = {"test", "tests", "idle_test", "idlelib_test"}


@dataclass
class DataConfig:
    """Which documents to train on. No `paths`: the embedded default (the Python stdlib)."""

    paths: list[str] = field(default_factory=list)  # files, directories or globs: text, .jsonl, .parquet
    text_field: str = "text"  # the JSONL field / parquet column that holds each document
    val_fraction: float = 0.05  # share of documents held out, chosen by a hash of their id
    max_chars: int | None = None  # stop reading after this many characters (quick runs)


@dataclass
class Document:
    id: str
    text: str


def is_held_out(doc_id: str, val_fraction: float) -> bool:
    """Stable train/held-out assignment: the first 8 bytes of sha1(id) as a fraction of 2**64."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative id, path) of every stdlib .py file outside test directories and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = set(rel.parts[:-1])
        if "site-packages" in parts or "dist-packages" in parts or parts & TEST_DIRS:
            continue
        if rel.name.startswith("test_"):
            continue
        out.append((f"stdlib/{rel.as_posix()}", path))
    return out


def _expand(spec: str) -> list[Path]:
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        if not matches:
            raise AthanorError("no file matches this pattern", path=spec)
        return [m for m in matches if m.is_file()]
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise AthanorError("directory holds no files", path=path)
        return files
    if not path.exists():
        raise AthanorError("no such file or directory", path=path)
    return [path]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AthanorError(f"not UTF-8 text (byte {e.start})", path=path) from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    for lineno, row in jsonl_objects(path, "JSONL corpus"):
        if text_field not in row:
            raise AthanorError("missing", path=path, line=lineno, field=text_field)
        text = row[text_field]
        if not isinstance(text, str):
            raise AthanorError(f"must be a string, got {type(text).__name__}", path=path, line=lineno,
                               field=text_field)
        yield Document(f"{path}:{lineno}", text)


def open_parquet(path: Path) -> Any:
    """A `pyarrow.parquet.ParquetFile`; a missing pyarrow or an unreadable file is one error line."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AthanorError("reading parquet needs pyarrow: pip install 'athanor[parquet]'", path=path) from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise AthanorError(f"not a readable parquet file: {e}", path=path) from None


def _parquet_documents(path: Path, text_field: str) -> Iterator[Document]:
    pf = open_parquet(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise AthanorError(f"no such column (columns: {', '.join(names)})", path=path, field=text_field)
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield Document(f"{path}:{row}", text)


def iter_documents(config: DataConfig) -> Iterator[Document]:
    """Every document of the corpus, in a stable order. Raises on the first bad input."""
    total = 0
    if not config.paths:
        sources: Iterator[Document] = (Document(doc_id, _read_text(p)) for doc_id, p in stdlib_files())
    else:
        sources = _user_documents(config)
    for doc in sources:
        if not doc.text.strip():
            continue
        yield doc
        total += len(doc.text)
        if config.max_chars is not None and total >= config.max_chars:
            return


def _user_documents(config: DataConfig) -> Iterator[Document]:
    for spec in config.paths:
        for path in _expand(spec):
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from _jsonl_documents(path, config.text_field)
            elif suffix == ".parquet":
                yield from _parquet_documents(path, config.text_field)
            else:
                yield Document(str(path), _read_text(path))


def describe(config: DataConfig) -> str:
    return "Python standard library (embedded default)" if not config.paths else ", ".join(config.paths)
