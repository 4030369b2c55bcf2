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
