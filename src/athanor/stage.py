"""The stage contract: what a stage after pre-training is given (`Context`) and gives back (`Section`).

A stage is a function `Context -> Section`. The speedrun composes stages (athanor/speedrun.py lists
them in order); a stage imports this module, never the speedrun, so the dependencies point one way:
the speedrun knows its stages, a stage knows only this contract and the modules it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Context:
    """What the stages after pre-training get: the recipe, the run directory, the results so far."""

    # The composing recipe (the speedrun's `SpeedrunRecipe`): each stage reads its own section of
    # size knobs from it (`recipe.sft`, `recipe.draft`, ...) and `recipe.train` for the device.
    recipe: Any
    run_dir: Path
    pretrain: dict[str, Any]
    show_progress: bool = True
    results: dict[str, Any] = field(default_factory=dict)  # stages may leave numbers for later ones

    def say(self, line: str) -> None:
        """One line on the console about what a stage is doing now (between its progress bars)."""
        print(f"  {line}", flush=True)


@dataclass
class Section:
    """A stage's part of the report: a title and its Markdown body."""

    title: str
    markdown: str
    seconds: float = 0.0
    note: str = ""  # for the timings table, e.g. what an earlier run in this directory had done
