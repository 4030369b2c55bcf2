"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

The recipe is the usual one: write a temporary file in the same directory, flush and fsync it,
`os.replace` it over the target (atomic on POSIX), then fsync the directory so the rename
itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from athanor.errors import AthanorError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file, then move it over `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would have, like every other file.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def refuse_to_overwrite(path: str | Path, force: bool) -> None:
    """Writers that make a fresh file or directory call this first: what a user already has there
    (a run's weights, a GGUF file) is never replaced silently. An empty directory is fine;
    `force` (the CLI's --force) replaces on purpose. Writers that resume a run in place
    (pretrain, sft) do not call it: finding their own checkpoints there is the point."""
    path = Path(path)
    if force or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    what = "directory is not empty" if path.is_dir() else "file exists"
    raise AthanorError(f"{what}; pass --force to replace it, or choose another --out", path=path)


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to an append-only log (a resumable output), on disk before this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def jsonl_objects(path: str | Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL input file, read as it is iterated; an
    unreadable file, a line that is not JSON and one that is not an object are errors naming the file and
    line (`what` names the file in the first)."""
    path = Path(path)
    try:
        f = path.open("rb")  # lines decoded one by one, so a bad byte is reported at its own line
    except OSError as e:
        raise AthanorError(f"cannot read the {what} ({e.strerror})", path=path) from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise AthanorError(f"the {what} is not UTF-8 text ({e.reason})", path=path, line=n) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AthanorError(f"malformed JSON ({e.msg})", path=path, line=n) from None
            if not isinstance(record, dict):
                raise AthanorError(f"a record must be a JSON object, got {type(record).__name__}", path=path,
                                   line=n)
            yield n, record


def read_records(path: str | Path, what: str) -> list[dict[str, Any]]:
    """The records of an `append_record` log (none if it does not exist). A crash mid-append can only
    tear the last line: that one is dropped (with a warning) and the file rewritten without it; a bad
    line anywhere else is an error naming it (`what` says what the file is)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines):
                raise AthanorError(f"corrupt line in the {what}", path=path, line=n) from None
            print(f"warning: {path}:{n}: dropping a torn last line (an interrupted write)")
            atomic_write_text(path, "".join(ln + "\n" for ln in lines[:-1]))
    return records
