"""Plots and the Markdown report of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from athanor.io import atomic_write


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> None:
    """Training loss per step, with held-out loss where it was evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def plot_rl_curves(metrics_path: str | Path, out_png: str | Path) -> None:
    """An RL run's curves over optimizer steps: reward (each reward function's mean), held-out pass@1
    where it was evaluated, entropy and KL to the reference, and completion length with the share cut
    at the limit (TRL's metric names, as train/grpo.py logs them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in rows if r.get(key) is not None]

    rewards = sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    panels = [("reward", [(k.split("/")[1], series(k)) for k in rewards] + [("total", series("reward"))]),
              ("held-out pass@1 (greedy)", [("held-out", series("val_pass@1"))]),
              ("nats per token", [("entropy", series("entropy")), ("KL to reference", series("kl"))]),
              ("tokens / share", [("mean length (tokens)", series("completions/mean_length")),
                                  ("clipped at the limit (share)", series("completions/clipped_ratio"))])]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), dpi=110, sharex=True)
    for ax, (ylabel, lines) in zip(axes.flat, panels, strict=True):
        for label, points in lines:
            if points:
                ax.plot(*zip(*points, strict=True), "o-" if len(points) < 12 else "-", label=label, lw=1.2, ms=3)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def resume_note(resumed_from: int, steps: int) -> str:
    """What a timings row should say about a training stage this run resumed rather than ran whole:
    its seconds are this run's, which are not the stage's cost when an earlier run did the work."""
    if resumed_from <= 0:
        return ""
    if resumed_from >= steps:
        return f"reused: an earlier run trained all {steps} steps; this run only loaded and evaluated it"
    return f"resumed from step {resumed_from}: this run trained steps {resumed_from + 1}-{steps}"
