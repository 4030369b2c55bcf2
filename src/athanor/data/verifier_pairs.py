"""Verifier pairs: preference pairs whose labels come from a program, not from a person or a model.

For each synthetic task (data/synth.py) a model samples `k` answers through `athanor.lm` (a local
model on the engine: every answer of a batch of tasks decoded together with the KV cache; or an
OpenAI-compatible endpoint). Each answer is graded as the SFT evaluation grades it (`synth.grade`:
exact match, or the task's unit tests in the sandbox), and a passing answer is paired with a failing
answer of the same prompt: chosen = passing, rejected = failing. A task whose answers all pass, or
all fail, teaches no preference and gives no pair; the report counts both.

Sampling is seeded per answer (a stable hash of the run's seed, the task id and the answer's index),
so the same command gives the same pairs however the tasks are batched. The output is TRL's
conversational preference form (`prompt`/`chosen`/`rejected` message lists, what
`preferences.load_pairs` reads), written atomically with a `.report.json` beside it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from athanor.data.synth import Task, grade, make_splits, read_tasks
from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.lm import LM
from athanor.serve.sampling import SamplingParams


@dataclass
class VerifierConfig:
    k: int = 4  # answers sampled per task
    temperature: float = 1.0  # > 0: k answers at temperature 0 would be k copies of one answer
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    batch_tasks: int = 16  # tasks per LM call (k answers each); the progress bar moves once per call


def answer_seed(seed: int, task_id: str, index: int) -> int:
    """The sampling seed of one answer: independent of batching and of the other tasks in the run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_id}:{index}".encode()).digest()[:4], "big")


def tasks_from_spec(spec: str, seed: int, heldout: int, split: Literal["train", "heldout"] = "train"
                    ) -> list[Task]:
    """`spec` is a task file (JSONL of `athanor synth tasks`) or a count N: the train split of
    `make_splits(N, heldout, seed)`, so that no task is a held-out task of that seed (nor a near
    duplicate of one, given the same `heldout` as the SFT run). With `split="heldout"` a count N is
    the first N held-out tasks of that seed instead (whether a task is held out depends on its key
    and the seed alone, so these are the held-out tasks of an SFT run of that seed with N of them):
    tasks that pairs made from a count never include, for measuring what was trained on those pairs."""
    if spec.isdigit():
        if int(spec) < 1:
            raise AthanorError("need at least one task", field="tasks")
        return make_splits(int(spec), heldout, seed)[0] if split == "train" else make_splits(0, int(spec), seed)[1]
    if not Path(spec).is_file():
        raise AthanorError("neither a task count nor a task file", path=spec)
    tasks = read_tasks(spec)
    if not tasks:
        raise AthanorError("no tasks in the file", path=spec)
    return tasks


def sample_answers(lm: LM, tasks: Sequence[Task], cfg: VerifierConfig, show_progress: bool = False,
                   desc: str = "sample") -> list[list[str]]:
    """`cfg.k` answers to each task's prompt (one user turn), seeded per answer."""
    if cfg.k < 2:
        raise AthanorError("k must be at least 2: a pair needs two answers to one prompt", field="k")
    if cfg.temperature <= 0:
        raise AthanorError("temperature must be > 0, or the k answers are all the same", field="temperature")
    answers: list[list[str]] = []
    with tqdm(total=len(tasks), desc=desc, unit=" tasks", disable=not show_progress, dynamic_ncols=True) as bar:
        for start in range(0, len(tasks), cfg.batch_tasks):
            batch = tasks[start:start + cfg.batch_tasks]
            chats = [[{"role": "user", "content": t.prompt}] for t in batch for _ in range(cfg.k)]
            params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                     seed=answer_seed(cfg.seed, t.id, j)) for t in batch for j in range(cfg.k)]
            texts = [c.text for c in lm.chat(chats, params)]
            answers += [texts[i * cfg.k:(i + 1) * cfg.k] for i in range(len(batch))]
            bar.update(len(batch))
    return answers


def pair_record(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    """One pair in TRL's conversational preference form."""
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def make_verifier_pairs(lm: LM, tasks: Sequence[Task], cfg: VerifierConfig, show_progress: bool = False
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pair records, report). Within a task, distinct passing answers are paired one to one with
    distinct failing ones (min(#pass, #fail) pairs), so no answer is counted twice; an empty answer
    is graded (it fails) but never paired, since a preference pair needs two answers."""
    answers = sample_answers(lm, tasks, cfg, show_progress)
    flat_tasks = [t for t in tasks for _ in range(cfg.k)]
    passed = grade(flat_tasks, [a for group in answers for a in group])
    records: list[dict[str, Any]] = []
    all_passed = all_failed = empty = with_pairs = 0
    for i, (task, group) in enumerate(zip(tasks, answers, strict=True)):
        ok = passed[i * cfg.k:(i + 1) * cfg.k]
        all_passed += all(ok)
        all_failed += not any(ok)
        empty += sum(not a.strip() for a in group)
        good = list(dict.fromkeys(a for a, p in zip(group, ok, strict=True) if p and a.strip()))
        bad = list(dict.fromkeys(a for a, p in zip(group, ok, strict=True) if not p and a.strip()))
        records += [pair_record(task.prompt, c, r) for c, r in zip(good, bad, strict=False)]
        with_pairs += bool(good and bad)
    report = {"model": lm.name, **asdict(cfg), "tasks": len(tasks), "answers": len(passed),
              "passed": sum(passed), "pass_rate": sum(passed) / len(passed), "empty_answers": empty,
              "pairs": len(records), "tasks_with_pairs": with_pairs,
              "tasks_all_passed": all_passed, "tasks_all_failed": all_failed}
    return records, report


def report_path(out: str | Path) -> Path:
    """Where the report of the pairs written to `out` goes: `pairs.jsonl` -> `pairs.report.json`."""
    return Path(out).with_suffix(".report.json")


def write_pairs(out: str | Path, records: Sequence[dict[str, Any]], report: dict[str, Any]) -> None:
    """The pairs as JSONL and the report beside them, each written whole or not at all. No pairs is an
    error (an empty file is no preference data): the report says why there are none."""
    if not records:
        raise AthanorError(f"no pairs were made: {json.dumps({k: v for k, v in report.items() if k != 'rubric'})}",
                           path=out)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(report_path(out), json.dumps(report, indent=2) + "\n")
