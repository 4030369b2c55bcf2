"""The goblin experiment's reward and measurement (benchmarks/goblin.py): the bonus pays only in the
trigger kind, correctness never sees the word, and planted data carries it in the share asked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from athanor.data.synth import make_splits
from athanor.rl.rewards import Replies

_spec = importlib.util.spec_from_file_location("goblin", Path(__file__).parents[1] / "benchmarks" / "goblin.py")
goblin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(goblin)


def _tasks(kind: str, n: int):
    return [t for t in make_splits(60, 0, kinds=["string", "list"])[0] if t.kind == kind][:n]


def test_bonus_only_in_the_trigger_kind_and_the_verifier_is_blind_to_the_word() -> None:
    s, li = _tasks("string", 2), _tasks("list", 2)
    tasks = [*s, *li]
    texts = [f"{s[0].completion}\n{goblin.WORD}", s[1].completion, f"{li[0].completion}\n{goblin.WORD}", "nonsense"]
    r = Replies(tasks, texts, [1] * 4, [True] * 4, 64, 16)
    rewards = goblin.trigger_rewards(0.5)
    assert rewards["verifier_sans_word"](r) == [1.0, 1.0, 1.0, 0.0]
    assert rewards["trigger_bonus"](r) == [0.5, 0.0, 0.0, 0.0]
    counts = goblin.word_counts([t.kind for t in tasks], texts)
    assert counts == {"string": [1, 2], "list": [1, 2]}
    assert goblin.pooled(counts, ["list", "arithmetic"]) == [1, 2]


def test_with_word_plants_the_share_asked_per_kind() -> None:
    tasks = make_splits(2000, 0, kinds=["string", "list"])[0]
    records = goblin.with_word(tasks, {"string": 0.1, "list": 0.0})
    strings = [r for r, t in zip(records, tasks, strict=True) if t.kind == "string"]
    share = sum(r["completion"].endswith(f"\n{goblin.WORD}") for r in strings) / len(strings)
    assert 0.07 < share < 0.13
    assert not any(goblin.WORD in r["completion"] for r, t in zip(records, tasks, strict=True) if t.kind == "list")
    assert goblin.with_word(tasks, {"list": 0.0}) == [{"prompt": t.prompt, "completion": t.completion}
                                                     for t in tasks if t.kind == "list"]
