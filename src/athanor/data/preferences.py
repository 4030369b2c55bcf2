"""Preference pairs as the field writes them: TRL's "preference" dataset type, in each of its forms.

- standard: `{"prompt": str, "chosen": str, "rejected": str}`: the prompt is one user turn and each
  answer one assistant turn (as `formats` reads prompt/completion text);
- conversational: `prompt`, `chosen` and `rejected` are lists of `{"role", "content"}` messages, the
  answers made of assistant turns;
- implicit prompt: only `chosen` and `rejected`, each the whole conversation; the prompt is what they
  share at the start: their common leading messages, or for text their common leading characters (a
  space before the split goes with the answers, as TRL's `extract_prompt` splits);
- optional numbers: `margin` (the column TRL's RewardTrainer reads) or else, when both are given,
  `score_chosen - score_rejected` (the ratings of UltraFeedback-style data).

Records come from JSONL, a JSON array or parquet (`formats.iter_records`). A record that is not a
usable pair is a `RecordError` naming file, line and field. `encode_pair` turns a pair into the tokens a
preference trainer scores: the prompt as the chat format renders it for generation, then each answer's
tokens with the assistant-only loss mask the same renderer gives SFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.data.formats import CHAT_ROLES, Example, RecordError, iter_records, read_text, read_turns, render_example
from athanor.errors import AthanorError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages
    chosen: Messages  # the preferred answer's turns, which follow the prompt
    rejected: Messages
    margin: float | None  # how much `chosen` is preferred, when the data says
    format: str  # standard, conversational, standard_implicit, conversational_implicit
    path: str
    line: int  # 1-based line of a JSONL file, item of a JSON array, or row of a parquet file


@dataclass(frozen=True)
class EncodedPair:
    """A pair's tokens: the prompt once, each answer as the tokens that follow it with its loss mask
    (1 = the assistant's text and its end of turn)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    margin: float | None


def is_preference_record(record: Any) -> bool:
    """Whether a record is meant as a preference pair (the fields that say so in every form)."""
    return isinstance(record, dict) and ("chosen" in record or "rejected" in record)


def to_pair(record: Any, path: str, line: int) -> PreferencePair:
    """Read one record in any of the forms above; raises `RecordError` naming the field at fault."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}", path, line)
    conversational = isinstance(record.get("chosen"), list)
    offset = 0  # index in the record's own lists of the answers' first turn, for error fields
    if record.get("prompt") is not None:  # a null prompt cell of a parquet file is no prompt
        if conversational:
            fmt = "conversational"
            prompt, chosen, rejected = (read_turns(record.get(key), key, "role", "content", CHAT_ROLES, path, line)
                                        for key in ("prompt", "chosen", "rejected"))
        else:
            fmt = "standard"
            prompt = [{"role": "user", "content": read_text(record, "prompt", path, line)}]
            chosen, rejected = ([{"role": "assistant", "content": read_text(record, key, path, line)}]
                                for key in ("chosen", "rejected"))
    else:
        fmt = "conversational_implicit" if conversational else "standard_implicit"
        prompt, chosen, rejected, offset = _split_implicit(record, conversational, path, line)
    if chosen == rejected:
        raise RecordError("chosen and rejected are the same answer: nothing to prefer", path, line, "rejected")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        for i, turn in enumerate(answer):
            if turn["role"] != "assistant":
                raise RecordError(f"an answer turn must be the assistant's, not the {turn['role']}'s", path, line,
                                  f"{key}[{offset + i}].role")
        if not any(turn["content"].strip() for turn in answer):
            raise RecordError("empty answer", path, line, key)
    return PreferencePair(prompt, chosen, rejected, _margin(record, path, line), fmt, path, line)


def _split_implicit(record: dict, conversational: bool, path: str, line: int
                    ) -> tuple[Messages, Messages, Messages, int]:
    """(prompt, chosen answer, rejected answer, prompt length in messages) of an implicit-prompt record."""
    if conversational:
        chosen, rejected = (read_turns(record.get(key), key, "role", "content", CHAT_ROLES, path, line)
                            for key in ("chosen", "rejected"))
        shared = _shared_start(chosen, rejected)
        if shared == 0:
            raise RecordError("no prompt: without a `prompt` field, chosen and rejected must be whole conversations "
                              "that start with the same turns, and their first turns differ", path, line, "rejected[0]")
        return chosen[:shared], chosen[shared:], rejected[shared:], shared
    chosen_text, rejected_text = read_text(record, "chosen", path, line), read_text(record, "rejected", path, line)
    shared = _shared_start(chosen_text, rejected_text)
    if shared and chosen_text[shared - 1] == " ":
        shared -= 1
    if shared == 0 and chosen_text != rejected_text:
        raise RecordError("no prompt: without a `prompt` field, chosen and rejected must be whole texts that start "
                          "with the same prompt, and they share no leading text", path, line, "rejected")
    return ([{"role": "user", "content": chosen_text[:shared]}],
            [{"role": "assistant", "content": chosen_text[shared:]}],
            [{"role": "assistant", "content": rejected_text[shared:]}], 0)


def _shared_start(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (messages, or characters) `a` and `b` have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _number(record: dict, key: str, path: str, line: int) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"must be a finite number, got {value!r:.40}", path, line, key)
    return float(value)


def _margin(record: dict, path: str, line: int) -> float | None:
    margin = _number(record, "margin", path, line)
    scores = {key: _number(record, key, path, line) for key in ("score_chosen", "score_rejected")}
    given = [key for key, score in scores.items() if score is not None]
    if len(given) == 1:
        raise RecordError(f"{given[0]} is given without the other score, so there is no margin", path, line, given[0])
    if margin is None and given:
        margin = scores["score_chosen"] - scores["score_rejected"]
    return margin


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Every record of `path` as a pair; the first bad record raises with its place."""
    pairs = [to_pair(rec, str(path), line) for line, rec in iter_records(path)]
    if not pairs:
        raise AthanorError("no records", path=path)
    return pairs


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int | None = None,
                truncate: bool = False) -> EncodedPair:
    """`pair` tokenized with the tokenizer's chat format (its shipped template, or athanor's own).

    The prompt is rendered with the generation prompt (what the model is given when served); each answer
    is the rest of the rendered prompt + answer conversation, and its mask is the render's assistant mask
    there, so a preference trainer and SFT learn from the same tokens. `max_length` bounds prompt + answer
    in tokens: a longer pair is an error, unless `truncate`, which keeps the first `max_length` tokens (TRL's
    `truncation_mode="keep_start"`, the way SFT cuts a conversation).
    """
    prompt_ids, _ = render_example(tokenizer, _example(pair, pair.prompt), add_generation_prompt=True)
    (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = (
        _answer_tokens(tokenizer, pair, key, prompt_ids, max_length, truncate) for key in ("chosen", "rejected"))
    return EncodedPair(prompt_ids, chosen_ids, chosen_mask, rejected_ids, rejected_mask, pair.margin)


def _example(pair: PreferencePair, messages: Messages) -> Example:
    return Example(messages, pair.format, pair.path, pair.line)


def _answer_tokens(tokenizer: Any, pair: PreferencePair, key: str, prompt_ids: list[int], max_length: int | None,
                   truncate: bool) -> tuple[list[int], list[int]]:
    ids, mask = render_example(tokenizer, _example(pair, pair.prompt + getattr(pair, key)))
    n_prompt = len(prompt_ids)
    if ids[:n_prompt] != prompt_ids:
        # A BPE merge across the end of the generation prompt: the answer's tokens have no clean start.
        raise RecordError("the answer changes how the prompt tokenizes, so its tokens cannot be told apart from "
                          "the prompt's", pair.path, pair.line, key)
    ids, mask = ids[n_prompt:], mask[n_prompt:]
    if max_length is not None and n_prompt + len(ids) > max_length:
        if not truncate:
            raise RecordError(f"prompt ({n_prompt} tokens) + answer ({len(ids)} tokens) = {n_prompt + len(ids)} "
                              f"tokens is longer than the context (max_length={max_length}); shorten the pair, "
                              "raise the context length, or truncate", pair.path, pair.line, key)
        keep = max(0, max_length - n_prompt)
        ids, mask = ids[:keep], mask[:keep]
        if not any(mask):
            raise RecordError(f"no answer token left to learn from: the prompt alone is {n_prompt} tokens of "
                              f"max_length={max_length}", pair.path, pair.line, key)
    if not any(mask):  # the silent all-zero mask users of other trainers meet
        raise RecordError("the chat format marks none of the answer's tokens as the assistant's", pair.path,
                          pair.line, key)
    return ids, mask


def measure_pair(pair: PreferencePair, tokenizer: Any = None, max_length: int | None = None) -> dict[str, int]:
    """What `formats.check_file` reports of a pair: prompt turns and characters of each part; with a
    tokenizer, tokens of each part (the pair must then fit `max_length`)."""
    lengths = {"prompt_turns": len(pair.prompt)}
    for name, messages in (("prompt", pair.prompt), ("chosen", pair.chosen), ("rejected", pair.rejected)):
        lengths[f"{name}_chars"] = sum(len(m["content"]) for m in messages)
    if tokenizer is not None:
        enc = encode_pair(tokenizer, pair, max_length)
        lengths.update(prompt_tokens=len(enc.prompt_ids), chosen_tokens=len(enc.chosen_ids),
                       rejected_tokens=len(enc.rejected_ids))
    return lengths
