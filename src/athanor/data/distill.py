"""The teacher trick: a stronger model writes instruction data for a weaker one (self-instruct).

Following Wang et al. (2022, "Self-Instruct") and Stanford Alpaca: the teacher is shown a few
instructions (seeds, and ones it already wrote) and asked for a new one; then it answers it. Each
candidate goes through filters before it is kept, and the reason for every rejection is logged:

- length: instruction and answer within bounds;
- novelty: no exact or near duplicate (word 3-gram Jaccard, as in synth.py) of a seed or of an
  accepted instruction (Self-Instruct used ROUGE-L < 0.7 for the same purpose);
- verifier, where there is one: code in the answer must run cleanly in the sandbox.

The teacher is any OpenAI-compatible endpoint (`/chat/completions`; base URL, model, API key from
an environment variable) or a local athanor run directory.

Output is append-only JSONL in Alpaca form, flushed and fsynced per record, with rejected
candidates in a sibling `.rejected.jsonl`: a crash, a Ctrl-C or a teacher that goes down loses
nothing, and running the same command again resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from athanor.data.formats import load_examples
from athanor.data.synth import extract_code, ngrams
from athanor.errors import AthanorError
from athanor.io import atomic_write_text


class Teacher(Protocol):
    name: str

    def chat(self, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str: ...


class TeacherError(AthanorError):
    """The teacher is unreachable or answered something that is not a chat completion."""


class HTTPTeacher:
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, athanor serve)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 retries: int = 2) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries = model, timeout, retries
        self.api_key = os.environ.get(api_key_env, "")
        self.name = f"{model} at {base_url}"

    def chat(self, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for _ in range(self.retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, body, headers), timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:  # the server answered: retrying will not help
                detail = e.read()[:200].decode(errors="replace")
                raise TeacherError(f"teacher {self.url} answered HTTP {e.code}: {detail!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
        else:
            raise TeacherError(f"teacher {self.url} is unreachable: {getattr(last, 'reason', last)}")
        try:
            reply = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise TeacherError(f"teacher {self.url} returned something that is not a chat completion: "
                               f"{raw[:200]!r}") from None
        if not isinstance(reply, str):
            raise TeacherError(f"teacher {self.url} returned a non-text message content: {reply!r:.200}")
        return reply


class LocalTeacher:
    """A model in an athanor run directory, sampled through its chat template."""

    def __init__(self, run_dir: str | Path, seed: int = 0) -> None:
        from athanor.model.hf import load_pretrained
        from athanor.tokenizer import Tokenizer

        self.model, self.tok = load_pretrained(run_dir).eval(), Tokenizer.load(run_dir)
        self.seed, self.calls, self.name = seed, 0, str(run_dir)

    def chat(self, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str:
        from athanor.serve.generate import generate

        ids, _ = self.tok.render_chat(messages, add_generation_prompt=True)
        # A teacher with a small context (a local run dir) sees the newest part of a long prompt rather
        # than refusing it: generate() itself, like the server, refuses a prompt that does not fit.
        ids = ids[-(self.model.config.max_position_embeddings - 1):]
        self.calls += 1
        out = generate(self.model, ids, max_tokens, temperature=temperature, top_k=50, seed=self.seed + self.calls,
                       stop_ids=[self.tok.end_id, self.tok.eos_id, *self.tok.role_ids.values()])
        return self.tok.decode(out)


def make_teacher(spec: str, model: str = "", api_key_env: str = "OPENAI_API_KEY", seed: int = 0) -> Teacher:
    """An http(s) URL is an endpoint; anything else must be a run directory."""
    if spec.startswith(("http://", "https://")):
        return HTTPTeacher(spec, model or "default", api_key_env)
    if not (Path(spec) / "config.json").is_file():
        raise AthanorError("teacher is neither an http(s) URL nor a model run directory", path=spec)
    return LocalTeacher(spec, seed)


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
        self.accepted: list[dict[str, Any]] = self._read(self.path)
        self.rejected: list[dict[str, Any]] = self._read(self.rejected_path)

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()
        records = []
        for n, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if n != len(lines):  # only the last line can be torn by a crash mid-write
                    raise AthanorError("corrupt line in the distillation output", path=path, line=n) from None
                print(f"warning: {path}:{n}: dropping a torn last line (an interrupted write)")
                atomic_write_text(path, "".join(ln + "\n" for ln in lines[:-1]))
        return records

    def append(self, record: dict[str, Any], accepted: bool) -> None:
        path = self.path if accepted else self.rejected_path
        (self.accepted if accepted else self.rejected).append(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _verify_code(answer: str) -> str | None:
    """None if the answer has no code or its code runs cleanly in the sandbox, else why not."""
    if "```" not in answer and not re.search(r"^\s*def \w+\(", answer, re.M):
        return None
    from athanor.rl.sandbox import Limits, run_python

    r = run_python(extract_code(answer), Limits(wall_s=5, cpu_s=2, memory_mb=256))
    return None if r.ok else f"code {r.verdict}: {r.stderr.strip().splitlines()[-1:] or r.detail}"


def distill(teacher: Teacher, out_path: str | Path, seeds: list[str], cfg: DistillConfig,
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
    except TeacherError as e:
        raise TeacherError(f"{e}. The {len(out.accepted)} accepted examples so far are safe in {out.path}; "
                           "run the same command again to resume") from None
    reasons: dict[str, int] = {}
    for r in out.rejected:
        key = r["rejected"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {"accepted": len(out.accepted), "rejected": len(out.rejected), "rejected_by_reason": reasons,
            "output": str(out.path)}


def _grow(teacher: Teacher, out: _Output, seeds: list[str], cfg: DistillConfig,
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
        instruction = clean_instruction(teacher.chat([{"role": "user", "content": EXPAND_PROMPT.format(
            examples=examples)}], cfg.temperature, cfg.max_tokens))
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
            answer = teacher.chat([{"role": "user", "content": instruction}], cfg.temperature, cfg.max_tokens).strip()
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
