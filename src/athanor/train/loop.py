"""The one trainer loop: every stage (pre-training, SFT, reward model, DPO, PPO, GRPO) runs here.

A stage supplies batches and a loss; the loop owns everything else: device and precision,
AdamW with warmup + cosine or WSD schedule, gradient accumulation with token-weighted loss,
clipping, a NaN/inf guard, DDP/FSDP2, atomic checkpoints with exact resume, a progress bar,
`metrics.jsonl` and the loss curve.

Loss scaling. A stage returns the *sum* of its per-token losses and the number of tokens it
counted. The loop first draws all micro-batches of a step, totals their tokens over every
rank, and backpropagates `sum / total_tokens`, so a step's gradient is the mean over all of
its tokens however they are split across micro-batches and ranks (averaging per-micro-batch
means instead over-weights short batches, a known pitfall with masked SFT losses).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from athanor.errors import AthanorError
from athanor.io import atomic_write, atomic_write_text
from athanor.train import dist
from athanor.train.dist import DistInfo, ParallelMode


@dataclass
class TrainConfig:
    """Optimization settings shared by every stage (defaults: the CPU speedrun's tiny model)."""

    max_steps: int = 400
    batch_size: int = 16  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end
    weight_decay: float = 0.1  # on matrices only, never on norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model (slow to start; pays off on big models / GPUs)
    device: str = "auto"  # auto, cpu, cuda
    parallel: ParallelMode = "auto"  # under torchrun: ddp (auto) or fsdp
    seed: int = 1337
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end)
    eval_tokens: int = 131072  # held-out tokens per evaluation
    ckpt_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite steps before giving up
    resume: bool = True  # continue from the newest checkpoint in the run directory


class Stage(Protocol):
    """What a training stage gives the loop."""

    def next_batch(self) -> Any: ...

    def loss_tokens(self, batch: Any) -> int:
        """How many tokens of `batch` count towards the loss (the denominator)."""

    def loss_sum(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of per-token losses over `batch`, and extra metrics to log."""

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD.

    WSD (warmup-stable-decay, Hu et al., 2024 "MiniCPM") holds the peak and decays linearly over
    the last `decay_fraction` of the run; cosine follows Loshchilov & Hutter (2017).
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return peak + (floor - peak) * frac
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True: one kernel over all parameters (CPU and CUDA) instead of a loop of small ops.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """`checkpoints/step_NNNNNNNN.pt`, each written whole to a temp file then renamed.

    A kill mid-write leaves only a hidden temp file (`.step_NNNNNNNN.pt.*.tmp`, io.atomic_write's
    naming), never a partial `step_*.pt`, so the newest visible checkpoint is always complete; one
    that still fails to load (disk damage) is skipped in favour of the one before it. The next
    start or save removes such leftovers, and pruning to `keep` runs on resume as well as after
    each save, so a kill between a save and its pruning leaves no extra checkpoint for good.
    """

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep = keep

    def paths(self) -> list[Path]:
        return sorted(self.dir.glob("step_*.pt"))

    def remove_temporaries(self) -> None:
        """Delete half-written checkpoints a killed run left behind (only one process writes here)."""
        for tmp in self.dir.glob(".step_*.pt.*.tmp"):
            tmp.unlink(missing_ok=True)

    def prune(self) -> None:
        """Keep only the newest `keep` checkpoints (all of them when `keep` is 0)."""
        for old in self.paths()[:-self.keep] if self.keep > 0 else []:
            old.unlink(missing_ok=True)

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.remove_temporaries()
        path = self.dir / f"step_{step:08d}.pt"
        atomic_write(path, lambda f: torch.save(state, f))
        self.prune()
        return path

    def clear(self) -> None:
        """Forget an earlier run's checkpoints, so a fresh start never resumes or keeps them."""
        self.remove_temporaries()
        for path in self.paths():
            path.unlink(missing_ok=True)

    def load_latest(self) -> dict[str, Any] | None:
        for path in reversed(self.paths()):
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:  # a damaged file: say so and fall back to the previous one
                print(f"warning: {path}: unreadable checkpoint ({e}); trying an older one")
        return None


class Trainer:
    """Runs `stage` on `model` for `cfg.max_steps` optimizer steps, writing into `run_dir`."""

    def __init__(self, model: nn.Module, stage: Stage, cfg: TrainConfig, run_dir: str | Path,
                 info: DistInfo, show_progress: bool = True, name: str = "train") -> None:
        """`name` labels the progress bar and the evaluation lines, so a console that shows
        several stages (the speedrun) says which one is speaking."""
        self.cfg, self.stage, self.info, self.name = cfg, stage, info, name
        self.run_dir = Path(run_dir)
        self.model = model.to(info.device)
        mode = "ddp" if cfg.parallel == "auto" else cfg.parallel
        self.wrapped = dist.wrap(self.model, info, mode)
        self.fsdp = info.distributed and mode == "fsdp"
        self.forward_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.optimizer = make_optimizer(self.wrapped, cfg)
        self.amp_dtype = autocast_dtype(cfg, info.device)
        if info.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever stays fp32 on Ampere+
        self.ckpts = Checkpoints(self.run_dir, cfg.keep_checkpoints)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.show_progress = show_progress and info.is_main
        self.step = 0
        self.resumed_from = 0  # the checkpoint step this run continued from (0: a fresh start)
        self.tokens_seen = 0
        self.bad_steps = 0

    # -- checkpointing -------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Full (unsharded) tensors on CPU: a checkpoint loads the same under 1, DDP or FSDP ranks.
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.wrapped, options=opts),
                get_optimizer_state_dict(self.wrapped, self.optimizer, options=opts))

    def save_checkpoint(self) -> None:
        model_sd, optim_sd = self._state_dicts()
        if self.info.is_main:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "model": model_sd, "optimizer": optim_sd,
                     "stage": self.stage.state_dict(), "rng": _rng_state(), "config": asdict(self.cfg)}
            self.ckpts.save(state, self.step)
        dist.barrier()

    def try_resume(self) -> bool:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self.ckpts.load_latest() if self.cfg.resume else None
        if state is None:
            return False
        opts = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(self.wrapped, state["model"], options=opts)
            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"], options=opts)
        except (RuntimeError, KeyError, ValueError) as e:
            raise AthanorError(f"its checkpoints do not fit this model ({str(e).splitlines()[0][:200]}); "
                               "use a new run directory or --train.resume=false", path=self.ckpts.dir) from None
        self.stage.load_state_dict(state["stage"])
        _set_rng_state(state["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.resumed_from = self.step
        if self.info.is_main:
            self._truncate_metrics(self.step)
            self.ckpts.remove_temporaries()
            self.ckpts.prune()
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from, so the log has no repeats."""
        if not self.metrics_path.is_file():
            return
        lines = [ln for ln in self.metrics_path.read_text().splitlines()
                 if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in lines))

    def _log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop ------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.info.device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch

    def evaluate(self) -> dict[str, float]:
        self.wrapped.eval()
        with torch.no_grad(), self._autocast():
            result = self.stage.evaluate(self.forward_model)
        self.wrapped.train()
        return result

    def accumulate_gradients(self) -> tuple[float, float, dict[str, float]]:
        """Draw one step's micro-batches and backpropagate their token-mean loss.

        Returns (summed loss over every rank, tokens counted over every rank, extra metrics).
        """
        batches = [self._to_device(self.stage.next_batch()) for _ in range(self.cfg.grad_accum)]
        local_tokens = sum(self.stage.loss_tokens(b) for b in batches)
        total_tokens = dist.all_reduce_sum(local_tokens, self.info.device)
        if total_tokens == 0:
            raise AthanorError("no token in this step counts towards the loss (is the loss mask all zeros?)")
        loss_sum, extra = 0.0, {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.fsdp or not self.info.distributed else \
                self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    loss, extra = self.stage.loss_sum(self.forward_model, batch)
                # DDP/FSDP average gradients over ranks; scale by world so the result is the
                # global token-mean rather than a mean of per-rank means.
                (loss * (self.info.world / total_tokens)).backward()
            loss_sum += loss.item()
        return dist.all_reduce_sum(loss_sum, self.info.device), total_tokens, extra

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, total_tokens, extra = self.accumulate_gradients()
        mean_loss = loss_sum / total_tokens
        grad_norm = float(nn.utils.clip_grad_norm_(self.wrapped.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            # NaN/inf guard: skip the update rather than poison the weights and the optimizer state.
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= cfg.max_bad_steps:
                raise AthanorError(f"{self.bad_steps} consecutive steps had a non-finite loss or gradient "
                                   f"(last loss {mean_loss}); lower train.lr or check the data")
            return {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "skipped": 1.0}
        self.bad_steps = 0
        self.optimizer.step()
        # The fused AdamW kernel writes the weights without bumping their version counters (torch
        # 2.13), which is how caches built from the weights (the engine's fast path, LocalLM's engine)
        # see that they changed: a stage that samples between steps (PPO) would sample a stale model.
        torch.autograd.graph.increment_version([p for p in self.wrapped.parameters() if p.requires_grad])
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += int(total_tokens)
        return {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, **extra}

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume()
        if not resumed and self.info.is_main:
            # A fresh start owns the directory: an earlier run's log and checkpoints (a later
            # step_*.pt would outrank this run's own on the next resume) go.
            self.metrics_path.unlink(missing_ok=True)
            self.ckpts.clear()
        self.wrapped.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.name, disable=not self.show_progress,
                   dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        window_t, window_tokens, window_losses = time.perf_counter(), self.tokens_seen, []
        while self.step < cfg.max_steps:
            record = self.train_step()
            self.step += 1
            window_losses.append(record["loss"])
            now = time.perf_counter()
            tok_s = (self.tokens_seen - window_tokens) / max(now - window_t, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            done = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or done:
                # Logged loss: the mean over the steps since the last line, so the curve is not
                # one noisy step out of every log_every.
                record["loss"] = sum(window_losses) / len(window_losses)
                self._log({"step": self.step, "tokens": self.tokens_seen, "tok_per_s": round(tok_s, 1),
                           **{k: round(v, 6) for k, v in record.items()}})
                window_t, window_tokens, window_losses = now, self.tokens_seen, []
            paused = time.perf_counter()
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or done:
                last_eval = self.evaluate()
                if last_eval:
                    self._log({"step": self.step, "tokens": self.tokens_seen, **last_eval})
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                    bar.write(f"{self.name} step {self.step}: {shown}")
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or done:
                self.save_checkpoint()
            window_t += time.perf_counter() - paused  # evaluation and checkpoints are not training throughput
        bar.close()
        if self.info.is_main:
            from athanor.report import plot_loss

            plot_loss(self.metrics_path, self.run_dir / "loss.png")
        return last_eval
