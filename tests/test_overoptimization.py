"""Best-of-n over-optimization: the estimator against enumeration of every subset, the KL formula against
the exact KL of a discrete policy, the verdict on made-up rewards, and whole runs (a rule behind a loopback
server and a tiny model on the engine, each scored by a tiny reward model) that write their files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_base, tiny_model_config
from teacher_server import ChatServer

from athanor.cli import main
from athanor.data.synth import grade, make_splits, write_tasks
from athanor.data.verifier_pairs import VerifierConfig
from athanor.lm.endpoint import EndpointLM
from athanor.model.hf import save_pretrained
from athanor.model.llama import LlamaModel
from athanor.rl.overoptimization import (
    OveroptConfig,
    best_of_n,
    best_of_n_kl,
    best_of_n_weights,
    finding,
    load_reward_model,
    measure,
    ns_up_to,
    speedrun_section,
    summarize,
)
from athanor.tokenizer import Tokenizer
from athanor.train.reward_model import RewardModel

TASKS = [t for t in make_splits(0, 12, seed=3)[1] if t.kind != "python"][:5]  # exact-match grading: fast


def enumerated_best_of_n(proxy: np.ndarray, gold: np.ndarray, n: int) -> float:
    """The definition: over every n-subset, the gold of its highest-proxy answer (the mean over the answers
    tied for highest: a uniform tie-break), averaged over the subsets."""
    picks = []
    for subset in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in subset)
        picks.append(np.mean([gold[i] for i in subset if proxy[i] == top]))
    return float(np.mean(picks))


def test_estimator_equals_the_average_over_every_subset() -> None:
    rng = np.random.default_rng(0)
    n_samples = 7
    proxy = rng.integers(0, 4, size=(6, n_samples)).astype(float)  # few values: ties within most rows
    gold = rng.random((6, n_samples)) < 0.5
    ns = list(range(1, n_samples + 1))
    estimate = best_of_n(proxy, gold, ns)
    for t in range(len(proxy)):
        for j, n in enumerate(ns):
            assert estimate[t, j] == pytest.approx(enumerated_best_of_n(proxy[t], gold[t], n), abs=1e-12)
    # n = 1 is the policy's mean; n = N the answers with the highest score; the proxy's own best-of-N its max.
    np.testing.assert_allclose(estimate[:, 0], gold.mean(1))
    np.testing.assert_allclose(estimate[:, -1], [g[p == p.max()].mean() for p, g in zip(proxy, gold, strict=True)])
    np.testing.assert_allclose(best_of_n(proxy, proxy, ns)[:, -1], proxy.max(1))
    for n in ns:
        assert best_of_n_weights(n_samples, n).sum() == pytest.approx(1.0)
    assert ns_up_to(64) == [1, 2, 4, 8, 16, 32, 64] and ns_up_to(48) == [1, 2, 4, 8, 16, 32, 48]


def exact_best_of_n_kl(outcomes: int, n: int) -> float:
    """KL(best-of-n || policy) for a policy uniform over `outcomes` distinct answers ranked by the reward:
    best-of-n picks the i-th (1-based) with probability (i/M)^n - ((i-1)/M)^n."""
    i = np.arange(1, outcomes + 1)
    p = (i / outcomes) ** n - ((i - 1) / outcomes) ** n
    return float(np.sum(p * np.log(p * outcomes)))


def test_kl_formula_is_the_limit_and_an_upper_bound_of_the_exact_kl() -> None:
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    for n in (2, 4, 16, 64):
        assert exact_best_of_n_kl(100_000, n) == pytest.approx(best_of_n_kl(n), abs=1e-3)  # many distinct answers
        assert exact_best_of_n_kl(10, n) < best_of_n_kl(n)  # few distinct answers: strictly less (Beirami et al.)


def ranked_rewards(tasks: int, n_samples: int, passing: range, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct proxy scores per task in random order, and gold = the answers whose proxy rank is in `passing`."""
    rng = np.random.default_rng(seed)
    proxy = np.stack([rng.permutation(n_samples) for _ in range(tasks)]).astype(float)
    return proxy + rng.random((tasks, 1)), np.isin(proxy, list(passing))


def test_summary_tells_a_gold_peak_and_fall_from_a_rise() -> None:
    # The reward model's two favourite answers are wrong: its best-of-16 always picks a wrong one.
    proxy, gold = ranked_rewards(40, 16, range(8, 14))
    result = summarize(proxy, gold, resamples=200, seed=0)
    golds = [r["gold"] for r in result["rows"]]
    assert [r["n"] for r in result["rows"]] == [1, 2, 4, 8, 16]
    assert golds[0] == pytest.approx(6 / 16) and golds[-1] == 0.0 and max(golds) > golds[0]
    assert result["peak"]["n"] == result["rows"][int(np.argmax(golds))]["n"] < 16
    assert result["peak"]["fall_ci95"][1] < 0
    assert "over-optimization" in finding(result) and "no over-optimization" not in finding(result)
    assert result["rm_agreement"]["accuracy"] == pytest.approx((6 * 8) / (6 * 10))  # above all 8 below, none of 2
    # The top half passes: gold climbs with the proxy to every task's passing answer.
    proxy, gold = ranked_rewards(40, 16, range(8, 16))
    result = summarize(proxy, gold, resamples=200, seed=0)
    assert result["rows"][-1]["gold"] == 1.0 and result["peak"]["n"] == 16
    assert result["rows"][-1]["gold_gain_ci95"][0] > 0 and result["rm_agreement"]["accuracy"] == 1.0
    assert "no over-optimization" in finding(result)


def tiny_reward_model(path: Path, tokenizer_dir: Path) -> Path:
    """An untrained tiny reward model saved as `athanor rm` saves one, with the test tokenizer."""
    torch.manual_seed(1)
    rm = RewardModel.from_language_model(LlamaModel(tiny_model_config()), Tokenizer.load(tokenizer_dir).pad_id, seed=2)
    save_pretrained(rm, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((tokenizer_dir / name).read_bytes())
    return path


def rule_policy(req: dict) -> str:
    """Right on one sampling seed in three, else one of two wrong answers (so answers repeat)."""
    task = next(t for t in TASKS if t.prompt == req["messages"][-1]["content"])
    return task.completion if req["seed"] % 3 == 0 else f"wrong {req['seed'] % 2}"


def test_measure_writes_numbers_that_the_samples_reproduce(tmp_path: Path, tokenizer_dir: Path) -> None:
    rm_dir = tiny_reward_model(tmp_path / "rm", tokenizer_dir)
    cfg = OveroptConfig(sampling=VerifierConfig(k=8, max_tokens=8, batch_tasks=2), score_batch=5, resamples=200)
    with ChatServer(rule_policy) as url:
        result = measure(EndpointLM(url, "rule"), rm_dir, TASKS, cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "overopt.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "overopt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "overopt.md").read_text()
    assert "![proxy and gold reward against sqrt KL](overopt.png)" in md and "| n | KL (nats) |" in md
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [t.prompt for t in TASKS]
    assert all(len(s["answers"]) == 8 for s in samples)
    texts = [a["text"] for s in samples for a in s["answers"]]
    assert len(set(texts)) < len(texts) and result["distinct_answers"] < len(texts)  # repeats, graded once
    # Gold: the verifier's grade of each answer. Proxy: the reward model's score of each answer alone.
    flat_tasks = [t for t in TASKS for _ in range(8)]
    assert [a["gold"] for s in samples for a in s["answers"]] == grade(flat_tasks, texts)
    rm, tok, _ = load_reward_model(rm_dir, device="cpu")
    with torch.no_grad():
        alone = [float(rm(torch.tensor([tok.render_chat([{"role": "user", "content": t.prompt},
                                                           {"role": "assistant", "content": a}])[0]])))
                 for t, a in zip(flat_tasks, texts, strict=True)]
    assert [a["proxy"] for s in samples for a in s["answers"]] == pytest.approx(alone, abs=1e-5)
    proxy = np.array([[a["proxy"] for a in s["answers"]] for s in samples])
    gold = np.array([[a["gold"] for a in s["answers"]] for s in samples])
    first, last = result["rows"][0], result["rows"][-1]
    assert 0 < result["pass_rate"] < 1 and first["gold"] == pytest.approx(result["pass_rate"])
    assert last["proxy"] == pytest.approx(proxy.max(1).mean())
    assert last["oracle_gold"] == pytest.approx(gold.any(1).mean())
    assert [r["n"] for r in result["rows"]] == [1, 2, 4, 8] and result["kl_formula"].startswith("KL(best-of-n")
    kinds = result["gold_by_kind"]  # each kind's tasks alone: together they make up the whole
    assert set(kinds) == {t.kind for t in TASKS} and "By task kind" in md
    for j, row in enumerate(result["rows"]):
        assert sum(v["tasks"] * v["gold"][j] for v in kinds.values()) / len(TASKS) == pytest.approx(row["gold"])


def test_command_line_on_a_tiny_model(tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    rm_dir = tiny_reward_model(tmp_path / "rm", tokenizer_dir)
    write_tasks(TASKS[:3], tmp_path / "tasks.jsonl")
    args = ["overopt", "--policy", str(base), "--rm", str(rm_dir), "--tasks", str(tmp_path / "tasks.jsonl"),
            "--quiet", "--sampling.max_tokens=8", "--resamples=100"]
    assert main([*args, "--n", "4", "--out", str(tmp_path / "out")]) == 0
    assert "gold pass rate" in capsys.readouterr().out
    numbers = json.loads((tmp_path / "out" / "overopt.json").read_text())
    assert numbers["tasks"] == 3 and numbers["answers"] == 12 and numbers["reward_model"] == str(rm_dir)
    for name in ("overopt.md", "overopt.png", "samples.jsonl"):
        assert (tmp_path / "out" / name).is_file()
    # What a user made is not overwritten; bad input is one line, before any sampling.
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "out2"), "--rm", str(base)]) == 2
    assert "head" in capsys.readouterr().err
    assert main([*args, "--n", "1", "--out", str(tmp_path / "out3")]) == 2
    assert "n must be at least 2" in capsys.readouterr().err


def test_report_section_links_the_plot_from_the_report(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny_base(tmp_path, tokenizer_dir)
    rm_dir = tiny_reward_model(tmp_path / "rm", tokenizer_dir)
    cfg = OveroptConfig(sampling=VerifierConfig(k=2, max_tokens=4), resamples=100)
    section = speedrun_section(base, rm_dir, TASKS[:2], cfg, tmp_path / "run" / "overopt", tmp_path / "run")
    assert section.title.startswith("Reward-model over-optimization")
    assert "](overopt/overopt.png)" in section.markdown and (tmp_path / "run" / "overopt" / "overopt.png").is_file()
