"""Pre-training: next-token prediction on token shards, the first stage on the trainer loop.

`pretrain(recipe)` takes a corpus to a run directory: it trains (or reuses) a tokenizer,
tokenizes the corpus into shards, trains the model, and saves the HF layout with held-out
loss and bits per byte beside a unigram baseline of the same tokenizer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from athanor.config import save_yaml
from athanor.data.corpus import DataConfig, is_held_out, iter_documents
from athanor.data.shards import TokenWindows, build_shards, eval_windows, open_tokens
from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.model.hf import save_pretrained
from athanor.model.llama import LlamaModel, ModelConfig
from athanor.tokenizer import Tokenizer, TokenizerConfig
from athanor.train import dist
from athanor.train.loop import TrainConfig, Trainer


@dataclass
class PretrainRecipe:
    """Everything a pre-training run needs; each key can be set in YAML or as --section.key=value."""

    out_dir: str = "runs/pretrain"
    tokenizer_path: str | None = None  # an existing tokenizer.json or run dir; None: train one on the corpus
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class HeldOutMetrics:
    """Held-out loss and bits per byte, for the model and for a unigram baseline.

    Bits per byte = total cross-entropy in bits / UTF-8 bytes the targets stand for. Unlike loss
    per token it does not depend on the tokenizer, so models with different vocabularies compare.
    Special tokens (BOS between documents) stand for no bytes and are left out of both sums.
    """

    def __init__(self, val_tokens: np.ndarray, train_tokens: np.ndarray, tokenizer: Tokenizer,
                 seq_len: int, batch_size: int, max_tokens: int) -> None:
        self.val_tokens, self.seq_len, self.batch_size, self.max_tokens = val_tokens, seq_len, batch_size, max_tokens
        self.byte_len = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float64)
        # Unigram baseline: token frequencies of the training split, add-one smoothed.
        counts = np.bincount(np.asarray(train_tokens), minlength=tokenizer.vocab_size).astype(np.float64) + 1.0
        self.unigram_logp = torch.from_numpy(np.log(counts / counts.sum()))

    def _targets(self) -> torch.Tensor:
        return torch.cat([y.reshape(-1) for _, y in eval_windows(self.val_tokens, self.seq_len, 1, self.max_tokens)])

    def tokens(self) -> int:
        """How many held-out target tokens the loss and bits per byte are measured on."""
        return int(self._targets().numel())

    def unigram_bpb(self) -> float:
        y = self._targets()
        nbytes = self.byte_len[y]
        keep = nbytes > 0
        return float(-(self.unigram_logp[y][keep]).sum() / math.log(2) / nbytes[keep].sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        nll_all, n_all, nll_bytes, nbytes = 0.0, 0, 0.0, 0.0
        for x, y in eval_windows(self.val_tokens, self.seq_len, self.batch_size, self.max_tokens):
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), reduction="none").double().cpu()
            b = self.byte_len[y.reshape(-1).cpu()]
            nll_all += float(nll.sum())
            n_all += nll.numel()
            nll_bytes += float(nll[b > 0].sum())
            nbytes += float(b.sum())
        return {"val_loss": nll_all / n_all, "val_bpb": nll_bytes / math.log(2) / nbytes}


class PretrainStage:
    """Batches of shuffled token windows; loss = summed next-token cross-entropy."""

    def __init__(self, windows: TokenWindows, held_out: HeldOutMetrics) -> None:
        self.windows, self.held_out = windows, held_out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.next_batch()

    def loss_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[1].numel()

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return model(x, targets=y), {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.held_out.evaluate(model)

    def state_dict(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state)


def prepare_tokenizer(recipe: PretrainRecipe, out_dir: Path, show_progress: bool = True) -> Tokenizer:
    """Reuse the run's tokenizer, load the one the recipe names, or train one on the corpus."""
    if (out_dir / "tokenizer.json").is_file():
        return Tokenizer.load(out_dir)
    if recipe.tokenizer_path:
        tok = Tokenizer.load(recipe.tokenizer_path)
    else:
        # Trained on the training split only: held-out text must not shape the vocabulary either.
        docs = iter_documents(recipe.data)
        tok = Tokenizer.train((d.text for d in docs if not is_held_out(d.id, recipe.data.val_fraction)),
                              recipe.tokenizer, show_progress=show_progress)
    tok.save(out_dir, model_max_length=recipe.model.max_position_embeddings)
    return tok


def pretrain(recipe: PretrainRecipe, show_progress: bool = True) -> dict[str, Any]:
    """Run pre-training end to end; returns the held-out results (also in `eval.json`)."""
    out_dir = Path(recipe.out_dir)
    info = dist.setup(recipe.train.device)
    timings: dict[str, float] = {}
    reused: dict[str, bool] = {}  # what an earlier run in this directory had made already
    try:
        t0 = time.perf_counter()
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            reused["tokenizer_reused"] = (out_dir / "tokenizer.json").is_file()
            tok = prepare_tokenizer(recipe, out_dir, show_progress)
            timings["tokenizer_s"] = time.perf_counter() - t0
            meta_path = out_dir / "data" / "meta.json"
            before = meta_path.stat().st_mtime_ns if meta_path.is_file() else None
            build_shards(recipe.data, tok, out_dir / "data", show_progress=show_progress)
            reused["shards_reused"] = before == meta_path.stat().st_mtime_ns  # build_shards rewrites it
            timings["shards_s"] = time.perf_counter() - t0 - timings["tokenizer_s"]
        dist.barrier()  # other ranks wait for the tokenizer and shards rank 0 made
        tok = Tokenizer.load(out_dir)
        recipe.model.vocab_size = tok.vocab_size
        recipe.model.bos_token_id, recipe.model.eos_token_id = tok.bos_id, tok.eos_id
        recipe.model.pad_token_id = tok.pad_id
        if recipe.train.seq_len > recipe.model.max_position_embeddings:
            raise AthanorError(f"train.seq_len {recipe.train.seq_len} exceeds model.max_position_embeddings "
                               f"{recipe.model.max_position_embeddings}", field="train.seq_len")
        if info.is_main:
            save_yaml(recipe, out_dir / "athanor.yaml")

        torch.manual_seed(recipe.train.seed)
        model = LlamaModel(recipe.model)
        cfg = recipe.train
        train_tokens = open_tokens(out_dir / "data", "train")
        windows = TokenWindows(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, info.rank, info.world)
        held_out = HeldOutMetrics(open_tokens(out_dir / "data", "val"), train_tokens, tok, cfg.seq_len,
                                  cfg.batch_size, cfg.eval_tokens)
        trainer = Trainer(model, PretrainStage(windows, held_out), cfg, out_dir, info, show_progress,
                          name="pretrain")
        t1 = time.perf_counter()
        final = trainer.fit() or trainer.evaluate()
        timings["train_s"] = time.perf_counter() - t1
        result = {**final, "unigram_bpb": held_out.unigram_bpb(), "val_tokens": held_out.tokens(),
                  "steps": cfg.max_steps,
                  "tokens_seen": trainer.tokens_seen, "parameters": recipe.model.num_parameters(),
                  "resumed_from_step": trainer.resumed_from, **reused,
                  **{k: round(v, 2) for k, v in timings.items()}}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trainer.wrapped, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
        if info.is_main:
            export = LlamaModel(recipe.model)
            export.load_state_dict(full)
            save_pretrained(export, out_dir)
            atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
        return result
    finally:
        dist.teardown()
