"""The teacher trick: a stronger model writes instruction data for a weaker one (self-instruct).

Following Wang et al. (2022, "Self-Instruct") and Stanford Alpaca: the teacher is shown a few
instructions (seeds, and ones it already wrote) and asked for a new one; then it answers it. Each
candidate goes through filters before it is kept, and the reason for every rejection is logged:

- length: instruction and answer within bounds;
- novelty: no exact or near duplicate (word 3-gram Jaccard, as in synth.py) of a seed or of an
  accepted instruction (Self-Instruct used ROUGE-L < 0.7 for the same purpose);
- verifier, where there is one: code in the answer must run cleanly in the sandbox.

The teacher is any `athanor.lm.LM`: an OpenAI-compatible endpoint (`/chat/completions`; base URL,
model, API key from an environment variable) or a local model directory.

Output is append-only JSONL in Alpaca form, flushed and fsynced per record, with rejected
candidates in a sibling `.rejected.jsonl`: a crash, a Ctrl-C or a teacher that goes down loses
nothing, and running the same command again resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.data.formats import load_examples
from athanor.data.synth import extract_code, ngrams
from athanor.errors import AthanorError
from athanor.io import append_record, read_records
from athanor.lm import LM, open_lm
from athanor.lm.endpoint import EndpointError
from athanor.serve.sampling import SamplingParams


def make_teacher(spec: str, model: str = "", api_key_env: str = "OPENAI_API_KEY") -> LM:
    """An http(s) URL is an OpenAI-compatible endpoint; anything else must be a model directory. A
    local teacher with a small context sees the newest part of a long prompt rather than refusing it."""
    return open_lm(spec, model, api_key_env, keep_prompt_tail=True)


@dataclass
class DistillConfig:
    n: int = 100  # accepted examples wanted in the output
    examples_in_prompt: int = 3  # instructions shown to the teacher per request
    min_instruction_chars: int = 10
    max_instruction_chars: int = 500
    max_output_chars: int = 2000
    near_dup_jaccard: float = 0.7
    temperature: float = 0.8
    max_tokens: int = 256
    max_attempts_factor: int = 10  # give up after n * factor candidates in total
    seed: int = 0


EXPAND_PROMPT = ("Here are some example tasks:\n{examples}\n\nWrite one new task of the same kind that is "
                 "different from all of these. Reply with the task only.")


def clean_instruction(reply: str) -> str:
    """The teacher's new task: drop a leading list number or 'Task:' label and surrounding quotes."""
    text = reply.strip()
    text = re.sub(r"^(\d+[.)]\s*|task\s*\d*\s*:\s*)", "", text, flags=re.I).strip()
    return text.strip('"').strip()


def seed_instructions(path: str | None, seed: int) -> list[str]:
    """Seeds from any instruction file (first user turn of each record), or the synthetic tasks."""
    if path:
        seeds = [next(m["content"] for m in ex.messages if m["role"] == "user")
                 for ex in load_examples(path) if any(m["role"] == "user" for m in ex.messages)]
    else:
        from athanor.data.synth import make_splits

        train, _, _ = make_splits(40, 1, seed)
        seeds = [t.prompt for t in train]
    if not seeds:
        raise AthanorError("no seed instructions (records need a user turn)", path=path)
    return seeds


class _Output:
    """The append-only output pair; every line is on disk before the next request."""

    def __init__(self, path: Path) -> None:
        self.path, self.rejected_path = path, path.with_suffix(".rejected.jsonl")
        self.accepted: list[dict[str, Any]] = read_records(self.path, "distillation output")
        self.rejected: list[dict[str, Any]] = read_records(self.rejected_path, "distillation output")

    def append(self, record: dict[str, Any], accepted: bool) -> None:
        path = self.path if accepted else self.rejected_path
        (self.accepted if accepted else self.rejected).append(record)
        append_record(path, record)


def _verify_code(answer: str) -> str | None:
    """None if the answer has no code or its code runs cleanly in the sandbox, else why not."""
    if "```" not in answer and not re.search(r"^\s*def \w+\(", answer, re.M):
        return None
    from athanor.rl.sandbox import Limits, run_python

    r = run_python(extract_code(answer), Limits(wall_s=5, cpu_s=2, memory_mb=256))
    return None if r.ok else f"code {r.verdict}: {r.stderr.strip().splitlines()[-1:] or r.detail}"


def distill(teacher: LM, out_path: str | Path, seeds: list[str], cfg: DistillConfig,
            verifier: Callable[[str], str | None] = _verify_code,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Grow `out_path` to `cfg.n` accepted examples; returns counts (accepted, rejected by reason)."""
    out = _Output(Path(out_path))
    known = [ngrams(s) for s in seeds] + [ngrams(r["instruction"]) for r in out.accepted]
    exact = {" ".join(s.lower().split()) for s in seeds} | {" ".join(r["instruction"].lower().split())
                                                          for r in out.accepted}
    limit = cfg.n * cfg.max_attempts_factor
    try:
        _grow(teacher, out, seeds, cfg, verifier, known, exact, limit, progress)
    except EndpointError as e:
        raise EndpointError(f"{e}. The {len(out.accepted)} accepted examples so far are safe in {out.path}; "
                           "run the same command again to resume") from None
    reasons: dict[str, int] = {}
    for r in out.rejected:
        key = r["rejected"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {"accepted": len(out.accepted), "rejected": len(out.rejected), "rejected_by_reason": reasons,
            "output": str(out.path)}


def _grow(teacher: LM, out: _Output, seeds: list[str], cfg: DistillConfig,
          verifier: Callable[[str], str | None], known: list, exact: set[str], limit: int,
          progress: Callable[[int, int], None] | None) -> None:
    while len(out.accepted) < cfg.n:
        attempt = len(out.accepted) + len(out.rejected)
        if attempt >= limit:
            raise AthanorError(f"only {len(out.accepted)} of {cfg.n} candidates passed the filters after "
                               f"{attempt} tries; see {out.rejected_path}")
        rng = random.Random(f"{cfg.seed}:{attempt}")  # resumable: attempt k draws the same examples
        pool = seeds + [r["instruction"] for r in out.accepted]
        shown = rng.sample(pool, min(cfg.examples_in_prompt, len(pool)))
        examples = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(shown))
        # Seeded per attempt and call, so a resumed run asks what an uninterrupted one would have.
        ask = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed + 2 * attempt)
        instruction = clean_instruction(teacher.chat([[{"role": "user", "content": EXPAND_PROMPT.format(
            examples=examples)}]], ask)[0].text)
        reason = None
        if not cfg.min_instruction_chars <= len(instruction) <= cfg.max_instruction_chars:
            reason = "instruction length"
        elif " ".join(instruction.lower().split()) in exact:
            reason = "duplicate"
        else:
            grams = ngrams(instruction)
            if any(len(grams & k) / len(grams | k) >= cfg.near_dup_jaccard for k in known):
                reason = "near duplicate"
        answer = ""
        if reason is None:
            answer = teacher.chat([[{"role": "user", "content": instruction}]],
                                  dataclasses.replace(ask, seed=ask.seed + 1))[0].text.strip()
            if not 1 <= len(answer) <= cfg.max_output_chars:
                reason = "answer length"
            else:
                reason = verifier(answer)
        record = {"instruction": instruction, "input": "", "output": answer, "teacher": teacher.name}
        if reason is None:
            out.append(record, accepted=True)
            known.append(ngrams(instruction))
            exact.add(" ".join(instruction.lower().split()))
        else:
            out.append({**record, "rejected": reason}, accepted=False)
        if progress:
            progress(len(out.accepted), cfg.n)
