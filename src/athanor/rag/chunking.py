"""Cutting documents into passages small enough to embed and to quote, each citing its lines.

Sizes are counted in tokens (words and punctuation marks: close to what a WordPiece or BPE
tokenizer makes of code). Prose is packed line by line up to `max_tokens`, each passage starting
with the last `overlap` tokens' worth of lines of the one before, so a sentence cut at a border
is whole in one of them. Python is cut along its syntax: each top-level function or class is
kept whole where it fits (a class too big is cut between its methods), and only code that has no
such border left falls back to lines. A passage never splits a line unless the line alone is
over the size; such a line is cut into pieces that all cite it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Chunk:
    source: str  # the document's name: a file path, or any id the caller gave
    start: int  # first line, 1-based
    end: int  # last line, inclusive
    text: str

    @property
    def id(self) -> str:
        return f"{self.source}:{self.start}-{self.end}"


def count_tokens(text: str) -> int:
    return len(TOKEN.findall(text))


@dataclass
class _Span:
    start: int  # 1-based line numbers, inclusive
    end: int
    tokens: int


def _line_spans(lines: list[str], start: int, end: int, max_tokens: int) -> list[tuple[_Span, str]]:
    """Lines start..end as spans; a line over the size is cut into pieces that all cite it."""
    out = []
    for n in range(start, end + 1):
        line = lines[n - 1]
        pieces = [m.start() for m in TOKEN.finditer(line)]
        if len(pieces) <= max_tokens:
            out.append((_Span(n, n, len(pieces)), line))
            continue
        for i in range(0, len(pieces), max_tokens):
            cut_end = pieces[i + max_tokens] if i + max_tokens < len(pieces) else len(line)
            out.append((_Span(n, n, min(max_tokens, len(pieces) - i)), line[pieces[i]:cut_end]))
    return out


def _pack(units: list[tuple[_Span, str]], source: str, max_tokens: int, overlap: int) -> list[Chunk]:
    """Greedy packing of consecutive units into passages of at most `max_tokens` (a unit over the size is a
    passage alone); each new passage repeats up to `overlap` tokens of trailing units of the last one."""
    chunks: list[Chunk] = []
    current: list[tuple[_Span, str]] = []

    def flush() -> None:
        if current and any(text.strip() for _, text in current):
            chunks.append(Chunk(source, current[0][0].start, current[-1][0].end,
                                "\n".join(text for _, text in current)))

    size = 0
    for unit in units:
        if current and size + unit[0].tokens > max_tokens:
            flush()
            carried, carried_size = [], 0
            for prev in reversed(current if overlap else []):
                if carried_size + prev[0].tokens > overlap:
                    break
                carried.insert(0, prev)
                carried_size += prev[0].tokens
            current, size = carried, carried_size
        current.append(unit)
        size += unit[0].tokens
    flush()
    return chunks


def _python_units(lines: list[str], body: list[ast.stmt], start: int, end: int,
                  max_tokens: int) -> list[tuple[_Span, str]]:
    """Lines start..end, whose statements are `body`, as units: each statement whole where it fits
    (decorators and comments just above it included), a class over the size opened into its body."""
    units: list[tuple[_Span, str]] = []
    line = start
    for node in body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        last = max(node.end_lineno or node.lineno, first)
        # Lines before the statement (blank lines, comments) go with it: a comment describes what follows.
        text = "\n".join(lines[line - 1:last])
        tokens = count_tokens(text)
        if tokens <= max_tokens:
            units.append((_Span(line, last, tokens), text))
        elif isinstance(node, ast.ClassDef) and node.body:
            inner_start = node.body[0].lineno
            units.extend(_line_spans(lines, line, inner_start - 1, max_tokens))
            units.extend(_python_units(lines, node.body, inner_start, last, max_tokens))
        else:
            units.extend(_line_spans(lines, line, last, max_tokens))
        line = last + 1
    units.extend(_line_spans(lines, line, end, max_tokens))
    return units


def chunk_document(source: str, text: str, max_tokens: int = 200, overlap: int = 40) -> list[Chunk]:
    """The passages of one document; Python (a `.py` source that parses) along its syntax."""
    if max_tokens < 1 or overlap < 0 or overlap >= max_tokens:
        raise ValueError(f"need 0 <= overlap < max_tokens, got overlap={overlap}, max_tokens={max_tokens}")
    lines = text.splitlines()
    if not lines:
        return []
    if source.endswith(".py"):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            tree = None
        if tree is not None:
            # Whole definitions are not repeated in the next passage; lines cut out of one are.
            return _pack(_python_units(lines, tree.body, 1, len(lines), max_tokens), source, max_tokens, 0)
    return _pack(_line_spans(lines, 1, len(lines), max_tokens), source, max_tokens, overlap)
