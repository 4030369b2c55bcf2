"""RLAIF: a model acting as judge decides which of two answers is better, and so makes preference pairs.

The judge is any `athanor.lm.LM` (a local run directory on the engine, or an OpenAI-compatible
endpoint). It is shown the prompt, a stated rubric and the two answers, delimited the way MT-Bench's
pairwise prompt delimits them, and asked for one letter. Judges prefer a position (Zheng et al. 2023,
"Judging LLM-as-a-judge"), so every comparison is asked twice, the answers swapped the second time:

- the verdict is parsed strictly: the reply, stripped of surrounding whitespace, must be exactly `A`
  or `B`, optionally in square brackets and followed by one period (`A`, `[B]`, `A.`); anything else
  (an explanation, "Both", a lower-case letter) is no verdict;
- the two verdicts are *consistent* when both parse and name the same answer; then that answer is
  chosen. An inconsistent or unparsed pair of verdicts counts as a tie and gives no pair.

The report gives the judge's position consistency (consistent comparisons / comparisons: a judge
that always answers "A" scores 0%), how often it named the first position, and, where the verifier
knows the answer (the prompt is a synthetic task and exactly one answer passes its grader), its
agreement with the verifier on the consistent comparisons.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from athanor.data.preferences import Messages, PreferencePair
from athanor.data.synth import Task, grade
from athanor.errors import AthanorError
from athanor.lm import LM
from athanor.serve.sampling import SamplingParams

RUBRIC = ("The better answer is the one that does what the user asked correctly: the right number, text or "
          "list, or code that works. If both are correct or both wrong, prefer the one that answers directly, "
          "without extra words.")
TEMPLATE = ("Please act as an impartial judge and compare two answers to the user's request below.\n"
            "Rubric: {rubric}\n"
            "The order in which the answers are shown says nothing about which is better.\n\n"
            "[User Request]\n{prompt}\n[End of User Request]\n\n"
            "[The Start of Answer A]\n{a}\n[The End of Answer A]\n\n"
            "[The Start of Answer B]\n{b}\n[The End of Answer B]\n\n"
            "Reply with exactly one letter: A if answer A is better, B if answer B is better.")
VERDICT = re.compile(r"\[?([AB])\]?\.?")


@dataclass
class JudgeConfig:
    rubric: str = RUBRIC
    max_tokens: int = 8  # a verdict is one letter; a longer reply is no verdict anyway
    temperature: float = 0.0  # a judge should not flip a coin; > 0 is seeded by `seed`
    seed: int = 0
    batch_pairs: int = 16  # comparisons per LM call (two prompts each); the progress bar moves once per call


def parse_verdict(reply: str) -> str | None:
    """"A" or "B", or None when the reply is not exactly one of them (see the module's rule)."""
    m = VERDICT.fullmatch(reply.strip())
    return m.group(1) if m else None


def render_turns(messages: Messages) -> str:
    """A prompt conversation as the judge reads it: a single user turn as its text, longer ones by role."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def answer_text(messages: Messages) -> str:
    """An answer (the assistant turns after the prompt) as the judge and the grader read it: its text."""
    return "\n\n".join(m["content"] for m in messages)


def judge_prompt(prompt: str, a: str, b: str, rubric: str = RUBRIC) -> str:
    return TEMPLATE.format(rubric=rubric, prompt=prompt, a=a, b=b)


def verifier_labels(pairs: Sequence[PreferencePair], tasks: Sequence[Task]) -> list[bool | None]:
    """For each pair, whether the verifier prefers its first answer (`chosen`): True or False where the
    prompt is one task's prompt and exactly one answer passes its grader, else None (unknown)."""
    by_prompt = {t.prompt: t for t in tasks}
    known = [(i, by_prompt[p.prompt[0]["content"]]) for i, p in enumerate(pairs)
             if len(p.prompt) == 1 and p.prompt[0]["content"] in by_prompt]
    passed = grade([t for _, t in known for _ in range(2)],
                   [answer_text(getattr(pairs[i], key)) for i, _ in known for key in ("chosen", "rejected")])
    labels: list[bool | None] = [None] * len(pairs)
    for n, (i, _) in enumerate(known):
        first, second = passed[2 * n], passed[2 * n + 1]
        labels[i] = first if first != second else None
    return labels


def judge_pairs(judge: LM, pairs: Sequence[PreferencePair], cfg: JudgeConfig,
                labels: Sequence[bool | None] | None = None, show_progress: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pair records, report): each pair's two answers compared in both orders; a consistent verdict
    makes a pair with the judge's choice as `chosen`. `labels`: the verifier's, from `verifier_labels`."""
    if not pairs:
        raise AthanorError("no pairs to judge")
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
    verdicts: list[tuple[str | None, str | None]] = []
    with tqdm(total=len(pairs), desc="judge", unit=" pairs", disable=not show_progress, dynamic_ncols=True) as bar:
        for start in range(0, len(pairs), cfg.batch_pairs):
            chats = []
            for p in pairs[start:start + cfg.batch_pairs]:
                x, y = answer_text(p.chosen), answer_text(p.rejected)
                chats += [[{"role": "user", "content": judge_prompt(render_turns(p.prompt), a, b, cfg.rubric)}]
                          for a, b in ((x, y), (y, x))]
            replies = [parse_verdict(c.text) for c in judge.chat(chats, params)]
            verdicts += list(zip(replies[::2], replies[1::2], strict=True))
            bar.update(len(chats) // 2)
    records: list[dict[str, Any]] = []
    agree = known = 0
    for i, (p, (first, second)) in enumerate(zip(pairs, verdicts, strict=True)):
        if first is None or second is None or first == second:  # both orders must name the same answer
            continue
        prefers_chosen = first == "A"  # in the first order A is the pair's `chosen`
        winner, loser = (p.chosen, p.rejected) if prefers_chosen else (p.rejected, p.chosen)
        records.append({"prompt": p.prompt, "chosen": winner, "rejected": loser})
        if labels is not None and labels[i] is not None:
            known += 1
            agree += labels[i] == prefers_chosen
    parsed = [v for pair in verdicts for v in pair if v is not None]
    report = {"judge": judge.name, **asdict(cfg), "comparisons": len(pairs), "consistent": len(records),
              "position_consistency": len(records) / len(pairs),
              "unparsed_verdicts": 2 * len(pairs) - len(parsed),
              "first_position_rate": parsed.count("A") / len(parsed) if parsed else None,
              "pairs": len(records)}
    if labels is not None:
        report.update(verifier_known=sum(lab is not None for lab in labels), verifier_known_consistent=known,
                      verifier_agreement=agree / known if known else None)
    return records, report

