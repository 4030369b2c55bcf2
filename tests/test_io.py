"""Atomic writes and the no-silent-overwrite rule of athanor/io.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from athanor.errors import AthanorError
from athanor.io import atomic_write_text, refuse_to_overwrite


def test_refuse_to_overwrite_protects_what_exists_unless_forced(tmp_path: Path) -> None:
    refuse_to_overwrite(tmp_path / "new", force=False)  # nothing there: fine
    (tmp_path / "empty").mkdir()
    refuse_to_overwrite(tmp_path / "empty", force=False)  # an empty directory holds nothing to lose
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(AthanorError, match="not empty.*--force"):
        refuse_to_overwrite(run, force=False)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(AthanorError, match="file exists.*--force"):
        refuse_to_overwrite(tmp_path / "m.gguf", force=False)
    refuse_to_overwrite(run, force=True)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path: Path, umask: int) -> None:
    """Like open(): 0644 under the usual umask, not mkstemp's private 0600."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "# report\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o666 & ~umask


def test_jsonl_objects_name_the_file_and_line(tmp_path):
    from athanor.errors import AthanorError
    from athanor.io import jsonl_objects

    good = tmp_path / "good.jsonl"
    good.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(jsonl_objects(good, "test file")) == [(1, {"a": 1}), (3, {"a": 2})]
    for text, message in [('{"a": 1}\n[1, 2]\n', "bad.jsonl:2: a record must be a JSON object, got list"),
                          ('{"a": 1}\n{"a": \n', "bad.jsonl:2: malformed JSON"),
                          (b'{"a": 1}\n\xff\n', "bad.jsonl:2: the test file is not UTF-8 text")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(AthanorError, match=message):
            list(jsonl_objects(bad, "test file"))
    with pytest.raises(AthanorError, match="missing.jsonl: cannot read the test file"):
        list(jsonl_objects(tmp_path / "missing.jsonl", "test file"))
