"""The words BM25 counts, for prose and code alike.

Code names hide words: `TemporaryDirectory`, `copy_tree`, `urlparse`. A query in plain English
("temporary directory") should match them, so an identifier is indexed whole and as its
camelCase / snake_case parts, lower-cased. English stop words are dropped: they carry no
signal for ranking and make the sparse matrices denser.
"""

from __future__ import annotations

import re

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from how i if in into is it its of on or that the their then "
    "there these this to was what when where which who why will with you your".split())


def terms(text: str) -> list[str]:
    """The index terms of `text`: each identifier lower-cased, followed by its parts when it has several."""
    out = []
    for word in WORD.findall(text):
        lower = word.lower()
        if lower not in STOP_WORDS and len(lower) > 1:
            out.append(lower)
        parts = [p.lower() for p in PART.findall(word)]
        if len(parts) > 1:
            out.extend(p for p in parts if p not in STOP_WORDS and len(p) > 1)
    return out
