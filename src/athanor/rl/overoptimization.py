"""Reward-model over-optimization made visible with best-of-n (Gao, Schulman & Hilton 2022, "Scaling
Laws for Reward Model Overoptimization").

A learned reward model (the proxy) is only a stand-in for what we want (the gold reward: here the
verifier of the synthetic tasks, exact match or unit tests in the sandbox). Optimizing the proxy
harder moves the policy further from where the proxy was trained, and past some distance the gold
reward stops following it. Best-of-n sampling by the proxy is the cheapest optimizer with a known
distance: for each task the policy samples N answers once; each answer gets its proxy score and its
gold grade; then, for n = 1, 2, 4, ..., N:

- Expected reward of best-of-n, estimated without bias from the N samples (Gao et al., section 2.2,
  after Nakano et al. 2021): with the proxy scores sorted ascending, the i-th smallest (1-based) is
  the largest of a random n-subset with probability C(i-1, n-1) / C(N, n), so E[gold of the pick] =
  sum_i C(i-1, n-1) / C(N, n) * gold_(i), and the same for the proxy. n = 1 gives the mean, n = N
  the maximum. Answers with equal proxy scores are picked uniformly among themselves, so their gold
  is averaged within the tie (duplicate answers score and grade alike anyway).
- Distance from the policy: KL(best-of-n || policy) = log n - (n - 1) / n nats, the analytic value
  Gao et al. use (from Stiennon et al. 2020); Beirami et al. (2024, "Theoretical guarantees on the
  best-of-n alignment policy") show it is an upper bound, reached when the answers are all distinct.
  Gao et al. plot against d = sqrt(KL); so does the plot here.
- Uncertainty: tasks are the unit (each task's estimate, from its own N samples, is independent of
  the others'), so every 95% interval is a percentile bootstrap over tasks; differences between two
  n are paired (the same resampled tasks).
- For scale, the same estimator with the gold as the selector gives the ceiling a perfect reward
  model would reach (it is pass@n, Chen et al. 2021).

`run_overoptimization` measures; `write_overoptimization` writes overopt.json, overopt.png,
overopt.md and samples.jsonl; `speedrun_section` does both and returns the report's section.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from athanor.data.synth import Task, grade
from athanor.data.verifier_pairs import VerifierConfig, sample_answers
from athanor.errors import AthanorError
from athanor.io import atomic_write, atomic_write_text
from athanor.lm import LM
from athanor.report import markdown_table
from athanor.stage import Section
from athanor.tokenizer import Tokenizer
from athanor.train.reward_model import RewardModel

KL_FORMULA = ("KL(best-of-n || policy) = log n - (n - 1)/n nats (Stiennon et al. 2020; an upper bound, "
              "Beirami et al. 2024)")
INTERVAL = "95% percentile bootstrap over tasks"


def default_sampling() -> VerifierConfig:
    """N = 64 answers per task at temperature 1 (the policy as it is); 4 tasks (256 answers) per LM call."""
    return VerifierConfig(k=64, batch_tasks=4)


@dataclass
class OveroptConfig:
    sampling: VerifierConfig = field(default_factory=default_sampling)  # k = N, the largest n
    score_batch: int = 64  # answers per reward-model forward
    resamples: int = 2000  # bootstrap resamples of the tasks
    seed: int = 0  # of the bootstrap

    def __post_init__(self) -> None:
        if self.sampling.k < 2:
            raise AthanorError("n must be at least 2: best-of-1 is the policy itself, nothing to compare",
                               field="sampling.k (--n)")
        if self.score_batch < 1:
            raise AthanorError("must be at least 1", field="score_batch")
        if self.resamples < 100:
            raise AthanorError("at least 100 resamples, or the 95% interval's ends are noise", field="resamples")


def ns_up_to(n_max: int) -> list[int]:
    """1, 2, 4, ... up to `n_max`, and `n_max` itself."""
    ns = [2 ** i for i in range(n_max.bit_length()) if 2 ** i <= n_max]
    return ns if ns[-1] == n_max else [*ns, n_max]


def best_of_n_kl(n: int) -> float:
    """The KL (nats) of best-of-n from the policy it samples, by the analytic formula (see the module)."""
    return math.log(n) - (n - 1) / n


def best_of_n_weights(n_samples: int, n: int) -> np.ndarray:
    """(n_samples,): the probability that the i-th smallest of `n_samples` values (0-based i) is the
    largest of a uniformly random n-subset: C(i, n-1) / C(n_samples, n)."""
    if not 1 <= n <= n_samples:
        raise ValueError(f"n must lie in [1, {n_samples}], got {n}")
    total = math.comb(n_samples, n)
    return np.array([math.comb(i, n - 1) / total for i in range(n_samples)])


def best_of_n(selector: np.ndarray, value: np.ndarray, ns: Sequence[int]) -> np.ndarray:
    """(tasks, len(ns)): the expected `value` of the answer that best-of-n by `selector` picks, for each
    task (a row of the (tasks, N) arrays) and each n, ties in `selector` broken uniformly at random."""
    order = np.argsort(selector, axis=1, kind="stable")
    keys = np.take_along_axis(selector, order, 1)
    vals = np.take_along_axis(value.astype(float), order, 1)
    for row_keys, row_vals in zip(keys, vals, strict=True):
        starts = np.flatnonzero(np.r_[True, row_keys[1:] != row_keys[:-1]])
        for a, b in zip(starts, [*starts[1:], len(row_keys)], strict=True):
            if b - a > 1:  # a tie: whichever of them the subset holds is equally likely to be the pick
                row_vals[a:b] = row_vals[a:b].mean()
    weights = np.stack([best_of_n_weights(selector.shape[1], n) for n in ns], axis=1)
    return vals @ weights


def bootstrap_means(per_task: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, columns): the column means of `per_task` (tasks, columns) over tasks drawn with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_task), size=(resamples, len(per_task)))
    return per_task[idx].mean(axis=1)


def interval(draws: np.ndarray) -> list[float]:
    """The 2.5% and 97.5% percentiles of bootstrap draws (along axis 0)."""
    return np.percentile(draws, [2.5, 97.5], axis=0).T.tolist()


@torch.no_grad()
def score_answers(rm: RewardModel, tok: Tokenizer, prompts: Sequence[str], answers: Sequence[str], batch: int,
                  show_progress: bool = False) -> list[float]:
    """The reward model's score of each (prompt, answer) conversation, rendered as `athanor rm` trains on it
    (the user's prompt, then the assistant's answer with its end of turn)."""
    rows = [tok.render_chat([{"role": "user", "content": p}, {"role": "assistant", "content": a}])[0]
            for p, a in zip(prompts, answers, strict=True)]
    context = rm.config.max_position_embeddings
    if rows and max(map(len, rows)) > context:
        raise AthanorError(f"a prompt + answer of {max(map(len, rows))} tokens is longer than the reward model's "
                           f"{context} positions; lower sampling.max_tokens", field="sampling.max_tokens")
    pad, device = rm.config.pad_token_id, next(rm.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # like lengths together: less padding
    scores = [0.0] * len(rows)
    with tqdm(total=len(rows), desc="score", unit=" answers", disable=not show_progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            ids = torch.full((len(chunk), max(len(rows[i]) for i in chunk)), pad, dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, :len(rows[i])] = torch.tensor(rows[i])
            for i, s in zip(chunk, rm(ids.to(device)).tolist(), strict=True):
                scores[i] = s
            bar.update(len(chunk))
    return scores


def _distinct(answers: Sequence[Sequence[str]]) -> tuple[list[tuple[int, str]], np.ndarray]:
    """Each task's distinct answers (task index, text), and for every sample its row in that list: a
    repeated answer is graded and scored once."""
    unique: dict[tuple[int, str], int] = {}
    where = np.array([[unique.setdefault((t, a), len(unique)) for a in group] for t, group in enumerate(answers)])
    return list(unique), where


def rm_agreement(proxy: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(tasks, 2): per task, the (passing, failing) answer pairs the reward model orders right (ties count
    half) and the number of such pairs; over samples, so a repeated answer counts each time it was drawn."""
    out = np.zeros((len(proxy), 2))
    for t, (p, g) in enumerate(zip(proxy, gold, strict=True)):
        diff = p[g][:, None] - p[~g][None, :]
        out[t] = ((diff > 0).sum() + 0.5 * (diff == 0).sum(), diff.size)
    return out


def _ratios(draws: np.ndarray) -> np.ndarray:
    """Right pairs / pairs of each bootstrap draw of `rm_agreement`'s columns; a draw of tasks without a
    single pair says nothing and is left out."""
    keep = draws[:, 1] > 0
    return draws[keep, 0] / draws[keep, 1]


def run_overoptimization(policy: LM, rm: RewardModel, rm_tok: Tokenizer, tasks: Sequence[Task], cfg: OveroptConfig,
                         show_progress: bool = False) -> dict[str, Any]:
    """Sample N answers per task from `policy`, score them with `rm` and grade them with the verifier, and
    estimate best-of-n's proxy and gold reward for each n (see the module). Returns the results and, under
    "samples", every answer with its scores."""
    if not tasks:
        raise AthanorError("no tasks to answer", field="tasks")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    answers = sample_answers(policy, tasks, cfg.sampling, show_progress, desc="sample")
    seconds["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    distinct, where = _distinct(answers)
    passed: list[bool] = []
    with tqdm(total=len(distinct), desc="grade", unit=" answers", disable=not show_progress,
              dynamic_ncols=True) as bar:
        for i in range(0, len(distinct), 256):
            chunk = distinct[i:i + 256]
            passed += grade([tasks[t] for t, _ in chunk], [a for _, a in chunk])
            bar.update(len(chunk))
    seconds["grade"] = time.perf_counter() - start

    start = time.perf_counter()
    scores = score_answers(rm, rm_tok, [tasks[t].prompt for t, _ in distinct], [a for _, a in distinct],
                           cfg.score_batch, show_progress)
    seconds["score"] = time.perf_counter() - start

    proxy, gold = np.array(scores)[where], np.array(passed)[where]
    ns = ns_up_to(cfg.sampling.k)
    kinds = np.array([t.kind for t in tasks])
    by_kind = {k: {"tasks": int((kinds == k).sum()),
                   "gold": best_of_n(proxy[kinds == k], gold[kinds == k], ns).mean(0).tolist()}
               for k in sorted(set(kinds))}
    samples = [{"id": task.id, "prompt": task.prompt,
                "answers": [{"text": a, "proxy": float(p), "gold": bool(g)}
                            for a, p, g in zip(group, proxy[t], gold[t], strict=True)]}
               for t, (task, group) in enumerate(zip(tasks, answers, strict=True))]
    return {"policy": policy.name, "tasks": len(tasks), "n_max": cfg.sampling.k, **asdict(cfg),
            "distinct_answers": len(distinct), **summarize(proxy, gold, cfg.resamples, cfg.seed),
            "gold_by_kind": by_kind, "seconds": seconds, "samples": samples}


def summarize(proxy: np.ndarray, gold: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    """The numbers of the measurement from each task's N samples (rows of the (tasks, N) arrays): the proxy
    scores and the gold grades (bool). For n = 1, 2, 4, ..., N: KL, expected proxy and gold of best-of-n
    with their intervals, gold's change from n = 1 and the pass@n ceiling; the peak of gold and its fall to
    n = N; the reward model's ordering of passing over failing answers."""
    ns = ns_up_to(proxy.shape[1])
    per_task_proxy, per_task_gold = best_of_n(proxy, proxy, ns), best_of_n(proxy, gold, ns)
    oracle = best_of_n(gold.astype(float), gold, ns)
    # One set of resampled tasks for every quantity, so that differences between them are paired.
    draws = bootstrap_means(np.concatenate([per_task_proxy, per_task_gold], axis=1), resamples, seed)
    proxy_draws, gold_draws = draws[:, :len(ns)], draws[:, len(ns):]
    proxy_mean, gold_mean, oracle_mean = per_task_proxy.mean(0), per_task_gold.mean(0), oracle.mean(0)
    rows = [{"n": n, "kl": best_of_n_kl(n), "sqrt_kl": math.sqrt(best_of_n_kl(n)),
             "proxy": float(proxy_mean[j]), "proxy_ci95": interval(proxy_draws[:, j]),
             "gold": float(gold_mean[j]), "gold_ci95": interval(gold_draws[:, j]),
             "gold_gain_ci95": interval(gold_draws[:, j] - gold_draws[:, 0]),
             "oracle_gold": float(oracle_mean[j])} for j, n in enumerate(ns)]
    peak = int(np.argmax(gold_mean))  # the first n of the highest gold
    agree = rm_agreement(proxy, gold)
    agree_draws = bootstrap_means(agree, resamples, seed + 1)
    pairs = int(agree[:, 1].sum())
    return {
        "answers": int(gold.size), "pass_rate": float(gold.mean()),
        "rm_agreement": {"accuracy": float(agree[:, 0].sum() / pairs) if pairs else None, "pairs": pairs,
                         "tasks_with_pairs": int((agree[:, 1] > 0).sum()),
                         "ci95": interval(_ratios(agree_draws)) if pairs else None},
        "kl_formula": KL_FORMULA, "interval": INTERVAL, "rows": rows,
        "peak": {"n": ns[peak], "gold": float(gold_mean[peak]),
                 "fall_to_n_max": float(gold_mean[-1] - gold_mean[peak]),
                 "fall_ci95": interval(gold_draws[:, -1] - gold_draws[:, peak])},
    }


def load_reward_model(path: str | Path, device: str | None = None) -> tuple[RewardModel, Tokenizer, dict[str, Any]]:
    """An `athanor rm` run directory (or a transformers ...ForSequenceClassification checkpoint with one
    label): the model in eval mode, its tokenizer, and its held-out numbers from eval.json (empty if none)."""
    from athanor.model.hf import load_pretrained

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rm = load_pretrained(path, device=device, model_class=RewardModel).eval()
    if rm.config.pad_token_id is None:
        raise AthanorError("the reward model's config names no pad_token_id, so batched answers cannot be "
                           "scored", path=Path(path) / "config.json", field="pad_token_id")
    eval_path = Path(path) / "eval.json"
    held = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    keys = ("val_accuracy", "val_accuracy_ci95_low", "val_accuracy_ci95_high", "heldout_pairs", "train_pairs")
    return rm, Tokenizer.load(path), {k: held[k] for k in keys if k in held}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pct_interval(ci: Sequence[float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _points(ci: Sequence[float]) -> str:
    """A difference of rates, in percentage points, with its interval."""
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] points"


def finding(result: dict[str, Any]) -> str:
    """What the run shows, in words: whether the gold reward peaks and falls while the proxy climbs."""
    rows, peak = result["rows"], result["peak"]
    first, last = rows[0], rows[-1]
    at_peak = next(r for r in rows if r["n"] == peak["n"])
    proxy = (f"Selecting harder by the reward model raises its own score (the proxy) from {first['proxy']:.2f} at "
             f"n = 1 to {last['proxy']:.2f} at n = {last['n']} (KL {last['kl']:.2f} nats), as it must. ")
    if peak["n"] < last["n"] and peak["fall_ci95"][1] < 0:
        gold = (f"The gold reward does not follow: the verifier's pass rate peaks at n = {peak['n']} (KL "
                f"{at_peak['kl']:.2f} nats, {_pct(peak['gold'])}) and then falls by {-100 * peak['fall_to_n_max']:.1f} "
                f"points by n = {last['n']} ({_points(peak['fall_ci95'])}, paired over tasks): over-optimization, "
                "the reward model's errors being selected for once its true signal is used up. The peak is "
                "chosen on the same data, which flatters the fall a little. ")
    elif peak["n"] < last["n"]:
        gold = (f"The verifier's pass rate is highest at n = {peak['n']} ({_pct(peak['gold'])}), but the fall from "
                f"there to n = {last['n']} ({_points(peak['fall_ci95'])}) is within the noise: no over-optimization "
                f"can be told apart at this KL and this many tasks. ")
    else:
        gold = (f"The verifier's pass rate rises with it all the way to n = {last['n']} ({_pct(first['gold'])} -> "
                f"{_pct(last['gold'])}): no over-optimization up to KL {last['kl']:.2f} nats; the reward model's "
                "errors have not yet begun to dominate what it selects. ")
    gain = (f"Against the policy itself, best-of-{last['n']} changes the pass rate by "
            f"{100 * (last['gold'] - first['gold']):+.1f} points ({_points(last['gold_gain_ci95'])}). ")
    headroom = last["oracle_gold"] - first["gold"]
    captured = (f", so the learned one captures {100 * (peak['gold'] - first['gold']) / headroom:.0f}% of the "
                "headroom at its best n" if headroom > 0 else "")
    ceiling = (f"A perfect reward model would reach {_pct(last['oracle_gold'])} (pass@{last['n']}: choose by the "
               f"verifier itself){captured}. ")
    agree = result["rm_agreement"]
    ranking = (f"On these held-out samples the reward model orders a passing above a failing answer of the same task "
               f"{_pct(agree['accuracy'])} of the time ({_pct_interval(agree['ci95'])}, {agree['pairs']:,} pairs "
               f"in {agree['tasks_with_pairs']} tasks)." if agree["pairs"] else
               "No task had both a passing and a failing answer, so the reward model's ranking cannot be checked.")
    return proxy + gold + gain + ceiling + ranking


def results_table(result: dict[str, Any]) -> str:
    return markdown_table([{
        "n": r["n"], "KL (nats)": f"{r['kl']:.2f}", "sqrt KL": f"{r['sqrt_kl']:.2f}",
        "proxy (RM score)": f"{r['proxy']:.3f} [{r['proxy_ci95'][0]:.3f}, {r['proxy_ci95'][1]:.3f}]",
        "gold (pass rate)": f"{_pct(r['gold'])} {_pct_interval(r['gold_ci95'])}",
        "gold vs n = 1": _points(r["gold_gain_ci95"]).replace(" points", ""),
        "pass@n (ceiling)": _pct(r["oracle_gold"]),
    } for r in result["rows"]])


def kind_table(result: dict[str, Any]) -> str:
    """Gold by task kind at n = 1, at the overall peak and at n = N: which kinds the reward model helps or hurts."""
    ns = [r["n"] for r in result["rows"]]
    cols = sorted({0, ns.index(result["peak"]["n"]), len(ns) - 1})
    return markdown_table([{"kind": kind, "tasks": v["tasks"],
                            **{f"gold at n = {ns[j]}": _pct(v["gold"][j]) for j in cols}}
                           for kind, v in result["gold_by_kind"].items()])


def overopt_markdown(result: dict[str, Any], image: str) -> str:
    """The report's text: the setup, what it shows, the table and the plot (`image`, a path relative to
    where the Markdown goes)."""
    s, rm = result["sampling"], result.get("reward_model_eval", {})
    rm_held = (f" (its own held-out pairs: accuracy {_pct(rm['val_accuracy'])}, 95% Wilson interval "
               f"{_pct_interval([rm['val_accuracy_ci95_low'], rm['val_accuracy_ci95_high']])}, {rm['heldout_pairs']} "
               "pairs)" if "val_accuracy_ci95_low" in rm else "")
    secs = result["seconds"]
    return "\n".join([
        f"Best-of-n against the learned reward model `{result.get('reward_model', '?')}`{rm_held}, with the "
        f"verifier's gold reward beside it (Gao et al. 2022). The policy `{result['policy']}` answered each of "
        f"{result['tasks']} tasks {result['n_max']} times (temperature {s['temperature']}, top-p {s['top_p']}, at most "
        f"{s['max_tokens']} tokens; {result['distinct_answers']:,} distinct answers of {result['answers']:,}, "
        f"pass rate {_pct(result['pass_rate'])}); the expected reward of picking the best of n by the reward model "
        "is estimated from those samples without bias for every n at once.",
        "",
        finding(result),
        "",
        results_table(result),
        "",
        "By task kind (the same estimate on each kind's tasks alone):",
        "",
        kind_table(result),
        "",
        f"![proxy and gold reward against sqrt KL]({image})",
        "",
        f"KL: {result['kl_formula']}. Intervals: {result['interval']} ({result['resamples']} resamples; "
        "the tasks are the unit, each with its own samples). Gold = the verifier's pass rate (exact match, or "
        f"unit tests in the sandbox). Run time: sampling {secs['sample']:.0f} s, grading {secs['grade']:.0f} s, "
        f"scoring {secs['score']:.0f} s.",
    ])


def plot_overoptimization(result: dict[str, Any], out_png: str | Path) -> None:
    """Gold (left axis, pass rate) and proxy (right axis, reward-model score) against sqrt(KL), with their
    95% intervals as bands, and the pass@n ceiling dotted; each point labelled with its n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    d = [r["sqrt_kl"] for r in rows]
    fig, gold_ax = plt.subplots(figsize=(7, 4), dpi=110)
    proxy_ax = gold_ax.twinx()
    gold_ax.plot(d, [100 * r["gold"] for r in rows], "o-", color="C0", lw=1.5, label="gold: verifier pass rate")
    gold_ax.fill_between(d, [100 * r["gold_ci95"][0] for r in rows], [100 * r["gold_ci95"][1] for r in rows],
                         color="C0", alpha=0.15)
    gold_ax.plot(d, [100 * r["oracle_gold"] for r in rows], ":", color="0.5", lw=1.2,
                 label="pass@n: choose by the verifier")
    proxy_ax.plot(d, [r["proxy"] for r in rows], "s--", color="C1", lw=1.5, label="proxy: reward-model score")
    proxy_ax.fill_between(d, [r["proxy_ci95"][0] for r in rows], [r["proxy_ci95"][1] for r in rows],
                          color="C1", alpha=0.15)
    for r in rows:
        gold_ax.annotate(f"n={r['n']}", (r["sqrt_kl"], 100 * r["gold"]), textcoords="offset points", xytext=(0, 6),
                         ha="center", fontsize=7, color="C0")
    gold_ax.set_xlabel("sqrt(KL(best-of-n || policy)), KL = log n - (n-1)/n nats")
    gold_ax.set_ylabel("gold: pass rate (%)", color="C0")
    proxy_ax.set_ylabel("proxy: reward-model score", color="C1")
    gold_ax.grid(alpha=0.3)
    lines = gold_ax.get_legend_handles_labels(), proxy_ax.get_legend_handles_labels()
    gold_ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def write_overoptimization(out_dir: str | Path, result: dict[str, Any]) -> dict[str, Path]:
    """overopt.json (the numbers), samples.jsonl (every answer with its proxy score and gold grade),
    overopt.png and overopt.md, each written whole or not at all; returns their paths."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in ("overopt.json", "samples.jsonl", "overopt.png", "overopt.md")}
    numbers = {k: v for k, v in result.items() if k != "samples"}
    atomic_write_text(paths["overopt.json"], json.dumps(numbers, indent=2) + "\n")
    atomic_write_text(paths["samples.jsonl"], "".join(json.dumps(s) + "\n" for s in result["samples"]))
    plot_overoptimization(result, paths["overopt.png"])
    atomic_write_text(paths["overopt.md"], "# Reward-model over-optimization (best-of-n)\n\n"
                      + overopt_markdown(result, "overopt.png") + "\n")
    return paths


def measure(policy: LM, reward_model: str | Path, tasks: Sequence[Task], cfg: OveroptConfig, out_dir: str | Path,
            show_progress: bool = False) -> dict[str, Any]:
    """The whole measurement: load the reward model (a directory), run, write the files into `out_dir`;
    returns the results (without the samples)."""
    rm, rm_tok, rm_eval = load_reward_model(reward_model)
    result = run_overoptimization(policy, rm, rm_tok, tasks, cfg, show_progress)
    result.update(reward_model=str(reward_model), reward_model_eval=rm_eval)
    write_overoptimization(out_dir, result)
    return {k: v for k, v in result.items() if k != "samples"}


def speedrun_section(policy: str | Path, reward_model: str | Path, tasks: Sequence[Task], cfg: OveroptConfig,
                     out_dir: str | Path, report_dir: str | Path, show_progress: bool = False) -> Section:
    """For a report: measure `policy` (a model directory) into `out_dir`, and return the section whose plot
    link is relative to `report_dir` (where the report's Markdown is written)."""
    from athanor.lm import open_lm

    start = time.perf_counter()
    result = measure(open_lm(policy), reward_model, tasks, cfg, out_dir, show_progress)
    image = Path(os.path.relpath(Path(out_dir, "overopt.png"), report_dir)).as_posix()
    return Section("Reward-model over-optimization (best-of-n)", overopt_markdown(result, image),
                   seconds=time.perf_counter() - start)
