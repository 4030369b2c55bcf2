"""Multi-turn GRPO with a Python tool (rl/environment.py, train/rollout.py `sample_episodes`): the tool runs
in the sandbox, a rollout's rows learn exactly the tokens the policy sampled and none of the tool turns', and
`athanor grpo --grpo.environment=python_tool` trains end to end.

A random model never writes a ```run block, so the policy here is a tiny model taught (a few hundred
steps on the rendered chats) to call the tool once and then answer: a real policy that uses the tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_base
from shipped_tokenizers import build, corpus_texts
from test_grpo_loop import TOY, _recipe

from athanor.data.synth import Task, make_splits
from athanor.errors import AthanorError
from athanor.lm.local import LocalLM
from athanor.model.hf import load_pretrained, save_pretrained
from athanor.rl import sandbox
from athanor.rl.environment import TOOL_ROLE, PythonTool
from athanor.rl.sandbox import Limits
from athanor.tokenizer import Tokenizer
from athanor.train.grpo import grpo
from athanor.train.rollout import response_rows, sample_episodes, sample_replies, tool_turn_ids

needs_sandbox = pytest.mark.skipif(sandbox.isolation_error() is not None,
                                   reason=f"no namespaces here: {sandbox.isolation_error()}")

CALL, OUTPUT, ANSWER = "```run\nprint(6 * 7)\n```", "42\n", "42"


def _runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each run of equal values in `mask`."""
    runs, start = [], 0
    for j in range(1, len(mask) + 1):
        if j == len(mask) or mask[j] != mask[start]:
            runs.append((mask[start], start, j))
            start = j
    return runs


@pytest.fixture(scope="module")
def tool_user(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A run dir: a tiny model taught to answer any arithmetic prompt with CALL and, once the tool has
    answered, with ANSWER."""
    out = tiny_base(tmp_path_factory.mktemp("tool_user"), tokenizer_dir)
    tok, model = Tokenizer.load(out), load_pretrained(out)
    tasks = make_splits(16, 0, seed=3, kinds=["arithmetic"])[0]
    rows = [tok.render_chat([{"role": "user", "content": t.prompt}, {"role": "assistant", "content": CALL},
                             {"role": TOOL_ROLE, "content": OUTPUT}, {"role": "assistant", "content": ANSWER}])
            for t in tasks]
    T = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), T - 1), tok.pad_id)
    y = torch.full((len(rows), T - 1), -100)
    for i, (ids, mask) in enumerate(rows):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor(ids[1:]).masked_fill(torch.tensor(mask[1:]) == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(x, targets=y) / (y != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    save_pretrained(model, out)
    return out


@needs_sandbox
def test_python_tool_runs_calls_in_the_sandbox() -> None:
    """A ```run block's code runs (all of a batch's at once) and its output comes back; a reply without
    one is final (None); an error's traceback, a runaway loop's verdict and a flood's cut are what the
    policy reads."""
    tool = PythonTool(Limits(wall_s=3, cpu_s=1), max_output_chars=64)
    say = lambda text: [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]  # noqa: E731
    replies = [f"let me check\n{CALL}", "```python\nprint(1)\n```", "```run\n1 / 0\n```",
               "```run\nwhile True: pass\n```", "```run\nprint('a' * 500, 'z')\n```"]
    task = Task("t", "arithmetic", "q", "1", "k")
    ok, final, error, loop, flood = tool.step([task] * len(replies), [say(r) for r in replies])
    assert ok == OUTPUT and final is None
    assert error.startswith("Traceback") and error.rstrip().endswith("division by zero")
    assert "[timeout:" in loop
    assert flood.startswith("a" * 32) and flood.rstrip().endswith("z") and "[... output truncated ...]" in flood
    assert len(flood) < 100


@needs_sandbox
def test_rows_learn_the_sampled_tokens_and_never_the_tool_turns(tool_user: Path) -> None:
    """Rollouts of a policy that calls the tool: every token of a rollout is either sampled (mask 1, its own
    target in the rows) or a tool turn rendered by the chat format (mask 0, target -100), and the first turn
    is exactly what single-turn sampling draws with the same seeds."""
    tok, model = Tokenizer.load(tool_user), load_pretrained(tool_user)
    lm = LocalLM(model, tok, max_batch=8)
    tasks = make_splits(8, 0, seed=5, kinds=["arithmetic"])[0]
    seeds = list(range(100, 108))
    ep = sample_episodes(lm, tok, tasks, PythonTool(), max_turns=3, max_new_tokens=40, temperature=0.7, seeds=seeds)
    one = sample_replies(lm, tok, tasks, 40, 0.7, seeds)
    newline = tok.encode("\n")
    called = 0
    for i in range(len(tasks)):
        runs, r = _runs(ep.masks[i]), ep.responses[i]
        assert ep.lengths[i] <= 40 and len(r) == len(ep.masks[i])
        assert r[:runs[0][2]] == one.responses[i]  # the first turn: what sample_replies drew
        replies = [m["content"] for m in ep.transcripts[i] if m["role"] == "assistant"]
        tools = [m["content"] for m in ep.transcripts[i][1:] if m["role"] == TOOL_ROLE]
        assert [v for v, _, _ in runs] == [1, 0] * len(tools) + [1] and ep.replies[i] == replies[-1]
        for (_, a, b), text in zip(runs[::2], replies, strict=True):
            assert tok.decode(r[a:b]) == text
        for (_, a, b), text in zip(runs[1::2], tools, strict=True):
            assert r[a - 1] == tok.end_id  # a tool turn follows a reply that closed its turn
            assert r[a:b] == [*newline, tok.role_ids[TOOL_ROLE], *tok.encode(text), tok.end_id, *newline,
                              tok.role_ids["assistant"]]
        called += tools == [OUTPUT]
    assert called >= 4, ep.transcripts  # the policy does use the tool, and reads what it printed

    x, y = response_rows(ep.prompts, ep.responses, tok.pad_id, ep.masks)
    for i, (p, r, m) in enumerate(zip(ep.prompts, ep.responses, ep.masks, strict=True)):
        assert x[i, :len(p) + len(r) - 1].tolist() == [*p, *r][:-1]
        targets = y[i, len(p) - 1:len(p) + len(r) - 1].tolist()
        assert targets == [t if keep else -100 for t, keep in zip(r, m, strict=True)]
        assert (y[i, :len(p) - 1] == -100).all() and (y[i, len(p) + len(r) - 1:] == -100).all()


@needs_sandbox
def test_grpo_with_the_python_tool_trains_and_logs_transcripts(tmp_path: Path, tool_user: Path) -> None:
    """`grpo.environment=python_tool`: two steps on the tool-using policy; the rollout log keeps the final
    reply as the completion (what the audit reads) and the whole conversation as the transcript."""
    recipe = _recipe(tmp_path, tool_user, steps=2, environment="python_tool", max_turns=3,
                     loss={"max_completion_length": 40})
    result = grpo(recipe, show_progress=False, rewards=TOY)
    assert result["rollouts"] == 1 and result["last_rollout"]["completions/mean_length"] > 0
    log = [json.loads(line) for line in (tmp_path / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert len(log) == 32
    for record in log:
        transcript = record["transcript"]
        assert transcript[0] == {"role": "user", "content": record["prompt"]}
        assert transcript[-1] == {"role": "assistant", "content": record["completion"]}
    assert sum({"role": TOOL_ROLE, "content": OUTPUT} in r["transcript"] for r in log) >= 16


def test_a_shipped_template_renders_the_tool_turn(tmp_path: Path) -> None:
    """With a model's own chat template (Llama 3's) the tool turn is that template's rendering of it."""
    tok = Tokenizer.load(build("llama3", corpus_texts(30_000), tmp_path, vocab_size=400))
    conversation = [{"role": "user", "content": "6 * 7?"}, {"role": "assistant", "content": CALL},
                    {"role": TOOL_ROLE, "content": OUTPUT}]
    assert tok.decode(tool_turn_ids(tok, conversation), skip_special=False) == \
        "<|start_header_id|>user<|end_header_id|>\n\n42<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_single_turn_stays_the_default(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Without an environment the log has no transcripts; an unknown environment is a one-line error."""
    base = tiny_base(tmp_path, tokenizer_dir)
    grpo(_recipe(tmp_path, base, steps=2), show_progress=False, rewards=TOY)
    log = [json.loads(line) for line in (tmp_path / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert log and all("transcript" not in r for r in log)
    with pytest.raises(AthanorError, match="environment must be one of single, python_tool"):
        grpo(_recipe(tmp_path, base, steps=2, environment="bash"), show_progress=False, rewards=TOY)
