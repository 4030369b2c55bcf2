"""The agent harness end to end against a scripted model: a real OpenAI-compatible HTTP server on
loopback (tests/teacher_server.py) that replays a script of tool calls, the real sandbox, real files."""

from __future__ import annotations

import json
from typing import Any

import pytest
from teacher_server import ChatServer

from athanor.agent.loop import Agent, AgentLimits
from athanor.agent.tools import Tool, Workspace, schema
from athanor.errors import AthanorError
from athanor.io import read_records
from athanor.lm.endpoint import EndpointError, EndpointLM


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def native(*calls: dict[str, Any], raw: str | None = None) -> dict[str, Any]:
    """An assistant message with OpenAI tool_calls (`raw`: the first call's arguments as sent, verbatim)."""
    tcs = [{"id": f"call_{i}", "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"]) if raw is None else raw}}
           for i, c in enumerate(calls)]
    return {"role": "assistant", "content": None, "tool_calls": tcs}


def text(*calls: dict[str, Any]) -> str:
    return "Let me do that.\n" + "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>\n" for c in calls)


class Script:
    """The model: reply number k (counted from the assistant turns already in the request) is
    `replies[k]`, so a retried request gets the same reply; the first `fail` requests answer HTTP 500."""

    def __init__(self, replies: list[Any], fail: int = 0) -> None:
        self.replies, self.fail, self.requests = replies, fail, []

    def __call__(self, req: dict[str, Any]) -> Any:
        self.requests.append(req)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("overloaded")
        k = sum(m["role"] == "assistant" for m in req["messages"])
        return self.replies[min(k, len(self.replies) - 1)]


def agent(url: str, work, tmp_path, limits: AgentLimits | None = None, tools: list[Tool] | None = None,
          **kw: Any) -> Agent:
    lm = EndpointLM(url, "scripted", retries=3, backoff_s=0.01)
    return Agent(lm, Workspace(work).tools() + (tools or []), tmp_path / "trajectory.jsonl", limits, **kw)


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    (d / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    return d


TASKS = {
    # task: (script, check of the work dir)
    "fix add() in calc.py": ([
        native(call("search", pattern="def add")),
        native(call("read_file", path="calc.py")),
        native(call("edit_file", path="calc.py", old="return a - b", new="return a + b")),
        native(call("bash", command="python -c 'import calc; print(calc.add(2, 3))'")),
        "Fixed: add() now adds.",
    ], lambda d: (d / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"),
    "write hello.py and run it": ([
        native(call("write_file", path="pkg/hello.py", content="print('hello')\n")),
        native(call("python", code="import runpy; runpy.run_path('pkg/hello.py')")),
        "Done.",
    ], lambda d: (d / "pkg" / "hello.py").read_text() == "print('hello')\n"),
    "make notes.txt with a shell command": ([
        native(call("bash", command="seq 3 > notes.txt && wc -l notes.txt"),
               call("read_file", path="notes.txt")),
        "notes.txt holds 1 to 3.",
    ], lambda d: (d / "notes.txt").read_text() == "1\n2\n3\n"),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_small_file_editing_tasks_end_to_end(task, work, tmp_path):
    replies, check = TASKS[task]
    script = Script(replies)
    with ChatServer(script) as url:
        result = agent(url, work, tmp_path).run(task)
    assert result.reason == "done" and result.answer == replies[-1] and check(work)
    records = read_records(tmp_path / "trajectory.jsonl", "trajectory")
    assert [r["type"] for r in records][0] == "start" and records[-1]["type"] == "end"
    replies_seen = [r for r in records if r["type"] == "message" and "tool" not in r]
    results = [r for r in records if r["type"] == "message" and "tool" in r]
    assert len(replies_seen) == len(replies) == result.steps == len(script.requests)
    assert len(results) == sum(len(r["tool_calls"]) for r in replies if isinstance(r, dict))
    assert not any(r["error"] for r in results), [r["message"]["content"] for r in results]
    # The server was shown the tools and got each result back under its call's id.
    assert {t["function"]["name"] for t in script.requests[0]["tools"]} >= {"bash", "python", "edit_file"}
    last = script.requests[-1]["messages"]
    assert [m["tool_call_id"] for m in last if m["role"] == "tool"] == [r["call_id"] for r in results]


def test_tool_output_reaches_the_model(work, tmp_path):
    script = Script([native(call("bash", command="echo out; echo err >&2; exit 3")), "ok"])
    with ChatServer(script) as url:
        agent(url, work, tmp_path).run("run it")
    tool_msg = script.requests[-1]["messages"][-1]
    assert tool_msg["role"] == "tool" and "out" in tool_msg["content"] and "err" in tool_msg["content"]
    assert "[exit code 3]" in tool_msg["content"]


def test_a_server_that_fails_twice_then_answers_is_retried(work, tmp_path):
    script = Script([native(call("read_file", path="calc.py")), "read it"], fail=2)
    with ChatServer(script) as url:
        result = agent(url, work, tmp_path).run("read calc.py")
    assert result.reason == "done" and len(script.requests) == 2 + 2


def test_a_server_that_keeps_failing_is_recorded_and_resumable(work, tmp_path):
    with ChatServer(Script(["never"], fail=100)) as url, pytest.raises(EndpointError, match="HTTP 500"):
        agent(url, work, tmp_path).run("task")
    records = read_records(tmp_path / "trajectory.jsonl", "trajectory")
    assert [r["type"] for r in records] == ["start", "error"]
    with ChatServer(Script(["fine now"])) as url:
        assert agent(url, work, tmp_path).run("task").answer == "fine now"


def test_a_tool_that_raises_returns_an_error_message(work, tmp_path):
    def explode(args: dict[str, Any]) -> str:
        raise RuntimeError("the disk is on fire")

    boom = Tool("boom", "always fails", schema({}), explode)
    script = Script([native(call("boom")), native(call("nope")), "I could not do it."])
    with ChatServer(script) as url:
        result = agent(url, work, tmp_path, tools=[boom]).run("try boom")
    assert result.reason == "done"
    answers = [m["content"] for m in script.requests[-1]["messages"] if m["role"] == "tool"]
    assert answers[0] == "error: RuntimeError: the disk is on fire"
    assert answers[1].startswith("error: there is no tool 'nope'")


def test_bad_json_arguments_are_answered_not_fatal(work, tmp_path):
    script = Script([native(call("write_file"), raw='{"path": "a.txt", "content": '),
                     native(call("write_file", path="a.txt", content="x")), "ok"])
    with ChatServer(script) as url:
        result = agent(url, work, tmp_path).run("write a.txt")
    first = script.requests[1]["messages"][-1]["content"]
    assert first.startswith("error: the arguments of 'write_file' are not valid JSON")
    assert result.reason == "done" and (work / "a.txt").read_text() == "x"


def test_paths_outside_the_work_dir_are_refused(work, tmp_path):
    (tmp_path / "secret").write_text("s3cret")
    (work / "link").symlink_to(tmp_path / "secret")
    script = Script([native(call("read_file", path="../secret"), call("read_file", path="link"),
                            call("write_file", path="/tmp/x", content="x")), "ok"])
    with ChatServer(script) as url:
        agent(url, work, tmp_path).run("escape")
    answers = [m["content"] for m in script.requests[-1]["messages"] if m["role"] == "tool"]
    assert all("outside the work directory" in a for a in answers) and not any("s3cret" in a for a in answers)


def test_text_protocol_for_models_without_tool_calls(work, tmp_path):
    script = Script([text(call("edit_file", path="calc.py", old="a - b", new="a + b")),
                     "<tool_call>{not json}</tool_call>", "Fixed."])
    with ChatServer(script) as url:
        result = agent(url, work, tmp_path, tool_format="text").run("fix calc.py")
    assert result.reason == "done" and "a + b" in (work / "calc.py").read_text()
    first = script.requests[0]
    assert "tools" not in first and "<tool_call>" in first["messages"][0]["content"]  # taught in the prompt
    last = script.requests[-1]["messages"]
    assert last[3]["role"] == "user" and last[3]["content"].startswith("<tool_response>\nedited calc.py")
    assert "not valid JSON" in last[5]["content"]


def test_step_token_and_time_limits(work, tmp_path):
    loop = [native(call("read_file", path="calc.py"))]
    for limits, reason in [(AgentLimits(max_steps=3), "max_steps"), (AgentLimits(max_tokens=1), "max_tokens"),
                           (AgentLimits(max_seconds=0), "max_seconds")]:
        (tmp_path / "trajectory.jsonl").unlink(missing_ok=True)
        script = Script(loop)
        with ChatServer(script) as url:
            result = agent(url, work, tmp_path, limits).run("loop forever")
        assert result.reason == reason
        assert len(script.requests) == {"max_steps": 3, "max_tokens": 1, "max_seconds": 0}[reason]
        assert read_records(tmp_path / "trajectory.jsonl", "t")[-1]["reason"] == reason


def test_old_tool_outputs_are_dropped_when_the_context_runs_low(work, tmp_path):
    (work / "big.txt").write_text("x" * 3000 + "\n")
    script = Script([native(call("read_file", path="big.txt"))] * 4 + ["done"])
    limits = AgentLimits(context=3000, context_fraction=1.0, reply_tokens=100, keep_recent=1)
    with ChatServer(script) as url:
        result = agent(url, work, tmp_path, limits).run("read big.txt many times")
    assert result.reason == "done"
    records = read_records(tmp_path / "trajectory.jsonl", "t")
    drops = [r for r in records if r["type"] == "context"]
    assert drops and all(r["tokens_after"] < r["tokens_before"] for r in drops)
    tool_msgs = [m["content"] for m in script.requests[-1]["messages"] if m["role"] == "tool"]
    assert tool_msgs[-1].count("x") == 3000 and "dropped to save context" in tool_msgs[0]


def test_a_rerun_resumes_the_trajectory(work, tmp_path):
    replies = [native(call("write_file", path="a.txt", content="1")),
               native(call("bash", command="printf 1 >> a.txt")), "done"]
    with ChatServer(Script(replies)) as url:
        assert agent(url, work, tmp_path, AgentLimits(max_steps=1)).run("task").reason == "max_steps"
    script = Script(replies)
    with ChatServer(script) as url:
        result = agent(url, work, tmp_path).run("task")
    assert result.reason == "done" and result.steps == 3 and len(script.requests) == 2
    assert (work / "a.txt").read_text() == "11"  # each tool ran once
    assert len(script.requests[0]["messages"]) == 4  # system, task, the first reply and its result
    with ChatServer(Script([])) as url:  # a finished run is not redone
        assert agent(url, work, tmp_path).run("task").answer == "done"
    with ChatServer(Script([])) as url, pytest.raises(AthanorError, match="another task"):
        agent(url, work, tmp_path).run("a different task")


def test_the_agent_command(work, tmp_path, capsys):
    from athanor.cli import main

    script = Script([native(call("edit_file", path="calc.py", old="a - b", new="a + b")), "Fixed add()."])
    traj = tmp_path / "t.jsonl"
    with ChatServer(script) as url:
        argv = ["agent", "--model", url, "--workdir", str(work), "--task", "fix calc.py", "--trajectory", str(traj)]
        assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "Fixed add()." and "done: 2 steps" in out.err
    assert "a + b" in (work / "calc.py").read_text()
    (tmp_path / "bad.json").write_text('{"mcpServers": {"x": {"command": 3}}}')
    assert main([*argv, "--mcp-config", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: field 'mcpServers.x.command'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["agent", "--help"])
    assert e.value.code == 0 and "--trajectory" in capsys.readouterr().out
