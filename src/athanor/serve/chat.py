"""`athanor chat RUN_DIR`: a streaming chat in the terminal, on the engine in this process."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained
from athanor.serve.engine import Engine
from athanor.serve.sampling import SamplingParams
from athanor.tokenizer import Tokenizer

HELP = "Type a message and press Enter. /reset forgets the conversation, /quit (or Ctrl-D) leaves."


def chat(run_dir: str | Path, system: str | None = None, temperature: float = 0.7, top_p: float = 0.95,
         max_tokens: int = 256, seed: int | None = None, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.load(run_dir)
    engine = Engine(load_pretrained(run_dir, device=device), max_batch=1, decode=tok.decode,
                    hold_ids=tok.stream_hold_ids)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop_ids=tok.stop_ids)
    params.validate(engine.vocab_size)  # bad settings fail now, not after the first message
    head = [{"role": "system", "content": system}] if system else []
    turns: list[dict[str, str]] = []
    out.write(HELP + "\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            turns = []
            continue
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line})
        ids = tok.encode_chat(head + turns, add_generation_prompt=True)
        while len(ids) >= engine.max_len - 1 and len(turns) > 1:  # forget the oldest exchange
            turns = turns[2:]
            ids = tok.encode_chat(head + turns, add_generation_prompt=True)

        def show(event, out: TextIO = out) -> None:
            out.write(event.text)
            out.flush()

        try:
            req = engine.submit(ids, params, on_event=show)
        except AthanorError as e:  # this message alone does not fit the context: say so and go on
            out.write(f"athanor: error: {e}; the message was not sent\n")
            turns.pop()
            continue
        out.write("assistant> ")
        out.flush()
        while not req.done:
            engine.step()
        out.write("\n")
        turns.append({"role": "assistant", "content": req.text})
