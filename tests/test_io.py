"""Atomic writes and the no-silent-overwrite rule of athanor/io.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from athanor.errors import AthanorError
from athanor.io import refuse_to_overwrite


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
