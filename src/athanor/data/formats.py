"""Instruction data as people already have it, normalized to chat `messages`.

One record per JSONL line (or the items of a JSON array, or the rows of a parquet file), in any of the
field's usual shapes:

- Alpaca: `{"instruction", "input" (optional), "output", "system" (optional)}`
  -> user = instruction, then a blank line and the input when there is one; assistant = output.
- OpenAI-style chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
- ShareGPT exports: `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`.
- prompt/completion: `{"prompt": str, "completion": str}`, or TRL's conversational variant where both
  are lists of messages.

Every problem is reported with file, line (or array index) and field, so a bad record in a
100k-line file is found at once; `check_file` collects them all without training anything (for
preference pairs too, read by data/preferences.py).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

from athanor.data.corpus import open_parquet
from athanor.errors import AthanorError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")
CHAT_ROLES = {r: r for r in ROLES}  # OpenAI-style messages name the roles as athanor does


@dataclass
class Example:
    messages: list[dict[str, str]]
    format: str  # alpaca, messages, sharegpt, prompt_completion
    path: str
    line: int  # 1-based line of a JSONL file, or 1-based item of a JSON array


class RecordError(AthanorError):
    """A record that cannot become a conversation; carries where it is."""

    def __init__(self, message: str, path: str, line: int, field: str | None = None) -> None:
        super().__init__(message, path=path, line=line, field=field)
        self.record_path, self.record_line, self.record_field = path, line, field


def read_text(record: dict, key: str, path: str, line: int, required: bool = True) -> str:
    """`record[key]` as text; missing (unless not `required`: then "") or not text is an error at `key`."""
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise RecordError(what, path, line, key)
    return value


def read_turns(items: Any, key: str, role_key: str, text_key: str, role_map: dict[str, str],
               path: str, line: int) -> list[dict[str, str]]:
    """`items` as {"role", "content"} messages; an item that is not a known turn is an error at `key[i]`."""
    if not isinstance(items, list) or not items:
        raise RecordError("must be a non-empty list of turns", path, line, key)
    out = []
    for i, turn in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError("must be an object", path, line, where)
        role = turn.get(role_key)
        if role not in role_map:
            raise RecordError(f"unknown role {role!r} (expected one of {sorted(role_map)})", path, line,
                              f"{where}.{role_key}")
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise RecordError("missing or not text", path, line, f"{where}.{text_key}")
        out.append({"role": role_map[role], "content": content})
    return out


def to_messages(record: Any, path: str, line: int) -> Example:
    """Normalize one record; raises `RecordError` naming the field at fault."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}", path, line)
    if "messages" in record:
        fmt = "messages"
        messages = read_turns(record["messages"], "messages", "role", "content", CHAT_ROLES, path, line)
    elif "conversations" in record:
        fmt, messages = "sharegpt", read_turns(record["conversations"], "conversations", "from", "value",
                                               SHAREGPT_ROLES, path, line)
    elif "instruction" in record or "output" in record:
        fmt = "alpaca"
        instruction, extra = read_text(record, "instruction", path, line), read_text(record, "input", path, line, False)
        system = read_text(record, "system", path, line, False)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
            {"role": "assistant", "content": read_text(record, "output", path, line)}]
    elif "prompt" in record or "completion" in record:
        fmt = "prompt_completion"
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form
            messages = (read_turns(prompt, "prompt", "role", "content", CHAT_ROLES, path, line)
                        + read_turns(completion, "completion", "role", "content", CHAT_ROLES, path, line))
        else:
            messages = [{"role": "user", "content": read_text(record, "prompt", path, line)},
                        {"role": "assistant", "content": read_text(record, "completion", path, line)}]
    else:
        raise RecordError(f"unrecognized record with keys {sorted(record)[:6]}; expected messages, conversations, "
                          "instruction/output (Alpaca) or prompt/completion", path, line)
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise RecordError("no assistant turn: nothing to learn from", path, line)
    if not any(m["content"].strip() for m in answers):
        raise RecordError("every assistant turn is empty", path, line, "assistant")
    return Example(messages, fmt, path, line)


def iter_records(path: str | Path, errors: list[RecordError] | None = None) -> Iterator[tuple[int, Any]]:
    """(line, parsed record) for JSONL, (1-based index, item) for a JSON array file, or (1-based row,
    {column: value}) for parquet (a null cell reads as None, so as a field that is not there).

    A JSONL line that is not UTF-8 or not JSON raises a `RecordError` naming it; given an
    `errors` list, it is appended there instead and the scan goes on with the next line.
    """
    path = Path(path)
    if not path.is_file():
        raise AthanorError("data file not found", path=path)
    if path.suffix.lower() == ".parquet":
        rows = (row for batch in open_parquet(path).iter_batches() for row in batch.to_pylist())
        yield from enumerate(rows, 1)
        return
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix == ".json" or head.startswith(b"["):
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise AthanorError(f"not UTF-8 text (byte {e.start})", path=path) from None
        except json.JSONDecodeError as e:
            raise AthanorError(f"not valid JSON: {e.msg}", path=path, line=e.lineno) from None
        if not isinstance(data, list):
            raise AthanorError("a .json data file must hold a list of records (or use JSONL)", path=path)
        yield from enumerate(data, 1)
        return
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                yield n, json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                why = f"not UTF-8 text (byte {e.start} of the line)" if isinstance(e, UnicodeDecodeError) \
                    else f"not valid JSON: {e.msg} (column {e.colno})"
                if errors is None:
                    raise RecordError(why, str(path), n) from None
                errors.append(RecordError(why, str(path), n))


def render_example(tokenizer: Any, ex: Example, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """`ex` as token ids and its assistant-only loss mask, from the tokenizer's chat format (a shipped
    model's own template); a conversation the template cannot render or mask is an error at its line.
    `add_generation_prompt`: end with the start of an assistant turn (a prompt the model answers)."""
    try:
        return tokenizer.render_chat(ex.messages, add_generation_prompt)
    except AthanorError as e:
        raise RecordError(f"cannot render this conversation with the tokenizer's chat format: {e}",
                          ex.path, ex.line) from None


def load_examples(path: str | Path) -> list[Example]:
    """Every record of `path` as a conversation; the first bad record raises with its place."""
    examples = [to_messages(rec, str(path), line) for line, rec in iter_records(path)]
    if not examples:
        raise AthanorError("no records", path=path)
    return examples


def measure_example(ex: Example, tokenizer: Any = None) -> dict[str, int]:
    """What `check_file` reports of an example: turns and characters; with a tokenizer, tokens of the
    rendered chat and of its loss-bearing part."""
    lengths = {"turns": len(ex.messages), "chars": sum(len(m["content"]) for m in ex.messages)}
    if tokenizer is not None:
        ids, mask = render_example(tokenizer, ex)
        lengths.update(tokens=len(ids), loss_tokens=sum(mask))
    return lengths


def check_file(path: str | Path, tokenizer: Any = None, max_errors: int = 20,
               max_length: int | None = None) -> dict[str, Any]:
    """Validate every record (not just the first bad one) and summarize, without training.

    The first record tells the kind of file: preference pairs (it has `chosen` or `rejected`; see
    `athanor.data.preferences`, where `max_length` applies) or instruction examples. Counts are of
    valid records; lengths are their min/mean/max (tokens too, given a tokenizer).
    """
    from athanor.data import preferences  # built on this module, so imported here

    bad: list[RecordError] = []  # in file order: lines that do not parse, records that do not convert
    records = iter_records(path, errors=bad)
    first = next(records, None)
    if first is not None and preferences.is_preference_record(first[1]):
        kind, convert = "preference pairs", preferences.to_pair
        measure = partial(preferences.measure_pair, tokenizer=tokenizer, max_length=max_length)
    else:
        kind, convert, measure = "examples", to_messages, partial(measure_example, tokenizer=tokenizer)
    formats: Counter[str] = Counter()
    lengths: dict[str, list[int]] = defaultdict(list)
    for line, rec in chain([first] if first is not None else [], records):
        try:
            item = convert(rec, str(path), line)
            measured = measure(item)
        except RecordError as e:
            bad.append(e)
            continue
        formats[item.format] += 1
        for name, n in measured.items():
            lengths[name].append(n)
    return {"path": str(path), "kind": kind, "examples": sum(formats.values()), "formats": dict(formats),
            "errors": len(bad), "error_list": [str(e) for e in bad[:max_errors]],
            "lengths": {name: {"min": min(xs), "mean": round(statistics.fmean(xs), 1), "max": max(xs)}
                        for name, xs in lengths.items()}}
