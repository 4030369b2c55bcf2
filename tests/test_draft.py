"""Distilling a speculative draft: the teacher data is the target's greedy output, and training on
it makes the draft agree with the target."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_model_config, tiny_recipe
from serve_helpers import naive_greedy, one_thread  # noqa: F401 (autouse fixture)

from athanor.model.hf import load_pretrained
from athanor.model.llama import LlamaModel
from athanor.serve.speculative import speculative_generate
from athanor.tokenizer import Tokenizer
from athanor.train.draft import (
    IGNORE,
    DistillStage,
    DraftConfig,
    distill_draft,
    draft_config,
    held_out_prompts,
    teacher_sequences,
)
from athanor.train.loop import TrainConfig
from athanor.train.pretrain import pretrain


def test_teacher_sequences_label_the_targets_greedy_continuations() -> None:
    torch.manual_seed(0)
    target = LlamaModel(tiny_model_config(initializer_range=0.25)).eval()
    prompts = [[5, 17, 33], list(range(40, 52)), [7]]
    x, y = teacher_sequences(target, prompts, new_tokens=6, batch=2)
    for row, p in enumerate(prompts):
        cont = naive_greedy(target, p, 6)
        assert x[row, :len(p) + 5].tolist() == p + cont[:-1]  # inputs: the sequence, shifted
        assert y[row, :len(p) - 1].eq(IGNORE).all()  # no loss on the prompt's corpus text
        assert y[row, len(p) - 1:len(p) + 5].tolist() == cont
        assert y[row, len(p) + 5:].eq(IGNORE).all()  # nor on padding


def test_distilled_draft_agrees_with_its_target(tmp_path: Path, tokenizer_dir: Path) -> None:
    run = tmp_path / "target"
    pretrain(tiny_recipe(run, tokenizer_dir, max_steps=30, ckpt_every=0), show_progress=False)
    target = load_pretrained(run)
    cfg = DraftConfig(prompts=48, new_tokens=24, held_out_prompts=8, teacher_batch=16, min_prompt_tokens=2,
                      max_prompt_tokens=12)
    train = TrainConfig(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, ckpt_every=0,
                        log_every=10, resume=False)
    result = distill_draft(target, run, run / "draft", train, cfg, show_progress=False)
    draft = load_pretrained(run / "draft")
    assert (draft.config.num_hidden_layers, draft.config.vocab_size) == (1, target.config.vocab_size)
    assert (run / "draft" / "tokenizer.json").is_file()
    # The held-out continuations distill_draft scored it on, and an untrained draft of the same shape.
    held_out = teacher_sequences(target, held_out_prompts(run, 8, Tokenizer.load(run).encode_prompt(""), seed=cfg.seed,
                                                          min_len=2, max_len=12), 24, 16)
    stage = DistillStage(held_out, held_out, 8, 0)
    assert stage.evaluate(draft)["agreement"] == result["agreement"]
    torch.manual_seed(0)
    untrained = stage.evaluate(LlamaModel(draft_config(target.config)))
    assert result["val_loss"] < 0.3 * untrained["val_loss"] and result["agreement"] > 0.6
    assert result["teacher_tokens"] == 48 * 24
    prompt = [1, 40, 41, 42]
    spec = speculative_generate(target, draft, prompt, 24, k=3, temperature=0)
    assert spec.output_ids == naive_greedy(target, prompt, 24)
    assert spec.acceptance > 0.5
