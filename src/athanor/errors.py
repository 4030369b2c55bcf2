"""One exception type for problems the user can fix.

The CLI prints an `AthanorError` as a single line (naming the file, line and field where
there is one) and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class AthanorError(Exception):
    """A problem with the user's input: a path, a data file, a recipe key."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field = path, line, field  # for callers that report them apart (HTTP)
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            where += ": "
        if field is not None:
            message = f"field {field!r}: {message}"
        super().__init__(where + message)
