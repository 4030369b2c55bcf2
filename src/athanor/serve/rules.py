"""The rules every generation request meets, wherever it comes from: the server's endpoints,
`athanor generate` and `athanor chat` all call `check_request`, so each bad prompt or setting is
refused everywhere with the same words (and the server's 400 names the field).

A prompt must leave at least one position of the context to generate into. `max_tokens` is an
upper bound, not a promise: generation also ends where the context is full (the server reports
finish_reason "length"), so asking for more than fits is not an error.
"""

from __future__ import annotations

from collections.abc import Sequence

from athanor.errors import AthanorError
from athanor.serve.sampling import SamplingParams


def check_request(prompt_ids: Sequence[int], params: SamplingParams, vocab_size: int, context: int) -> list[int]:
    """The prompt as a list of ints; raises AthanorError (with the field) for anything that breaks a rule."""
    params.validate(vocab_size)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise AthanorError("the prompt is empty", field="prompt")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise AthanorError("prompt token ids must be in the vocabulary", field="prompt")
    if len(prompt) >= context:
        raise AthanorError(f"the prompt has {len(prompt)} tokens; this model's context is {context} "
                           f"(at least one position must remain to generate)", field="prompt")
    return prompt
