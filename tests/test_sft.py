"""SFT: packing that keeps conversations apart, assistant-only loss, empty masks as errors, behavior eval."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_base, tiny_model_config

from athanor.data.formats import Example
from athanor.data.synth import Task
from athanor.errors import AthanorError
from athanor.model.llama import LlamaModel
from athanor.train import dist
from athanor.train.behavior import evaluate_behavior
from athanor.train.loop import TrainConfig, Trainer
from athanor.train.sft import IGNORE, SFTDataConfig, SFTRecipe, SFTStage, block_causal_mask, encode_examples, pack, sft

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Reverse 'abc'."},
     {"role": "assistant", "content": "cba"}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b"}],
]


def examples(convs=CONVERSATIONS) -> list[Example]:
    return [Example(c, "messages", "mem.jsonl", i + 1) for i, c in enumerate(convs)]



def test_packed_row_trains_like_separate_conversations(tokenizer):
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config()).double()
    enc = encode_examples(examples(), tokenizer, seq_len=100)
    rows = pack(enc, 100, tokenizer.pad_id, seed=0)
    assert rows["x"].shape[0] == 1  # all three share one row
    packed = model(rows["x"], attention_mask=block_causal_mask(rows["seg"]), targets=rows["y"])
    separate = 0.0
    for e in enc:
        x = torch.tensor([e.ids[:-1]])
        y = torch.tensor([[t if m else IGNORE for t, m in zip(e.ids[1:], e.mask[1:], strict=True)]])
        separate = separate + model(x, targets=y)
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-9)
    # Without the block mask the later conversations would see the earlier ones: a different loss.
    leaky = model(rows["x"], targets=rows["y"])
    assert abs(float((leaky - separate).detach())) > 1e-3


def test_loss_is_on_assistant_tokens_only(tokenizer):
    enc = encode_examples(examples(), tokenizer, seq_len=100)
    rows = pack(enc, 100, tokenizer.pad_id, seed=0)
    targets = rows["y"][rows["y"] != IGNORE].tolist()
    expected = [t for e in enc for t, m in zip(e.ids[1:], e.mask[1:], strict=True) if m]
    assert sorted(targets) == sorted(expected)  # the same tokens, whatever order packing chose
    text = tokenizer.decode(targets, skip_special=False)
    assert "5" in text and "cba" in text and "return a + b" in text
    assert "What is" not in text and "Be terse" not in text and "Reverse" not in text


def test_example_with_no_learnable_token_is_rejected_with_its_place(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(AthanorError, match=r"mem.jsonl:4: no assistant token left"):
        encode_examples(examples(CONVERSATIONS + [long_prompt]), tokenizer, seq_len=64)


def test_a_step_without_loss_tokens_is_an_error(tokenizer, tmp_path):
    enc = encode_examples(examples(), tokenizer, seq_len=64)
    rows = pack(enc, 64, tokenizer.pad_id, seed=0)
    rows["y"][:] = IGNORE  # as if the mask had silently come out all zeros
    stage = SFTStage(rows, None, batch_size=1, seed=0)
    trainer = Trainer(LlamaModel(tiny_model_config()), stage, TrainConfig(max_steps=1, ckpt_every=0, eval_every=0),
                      tmp_path, dist.setup("cpu"), show_progress=False)
    with pytest.raises(AthanorError, match="loss mask all zeros"):
        trainer.fit()


def test_behavior_counts_answers_and_passes(tokenizer):
    torch.manual_seed(2)
    model = LlamaModel(tiny_model_config())
    tasks = [Task("a", "arithmetic", "What is 2 + 3?", "5", "k")]
    r = evaluate_behavior(model, tokenizer, tasks, max_new_tokens=8)
    # An untrained model neither closes its turn nor answers right.
    assert r["answer_rate"] == 0.0 and r["pass_rate"] == 0.0 and r["by_kind"]["arithmetic"]["tasks"] == 1


@pytest.mark.slow
def test_sft_shifts_behavior_from_continuing_to_answering(tokenizer, tokenizer_dir, tmp_path):
    base = tiny_base(tmp_path, tokenizer_dir)
    recipe = SFTRecipe(out_dir=str(tmp_path / "sft"), base=str(base),
                       data=SFTDataConfig(synth_train=400, synth_heldout=30, synth_kinds=["arithmetic", "list"]),
                       train=TrainConfig(max_steps=80, batch_size=8, seq_len=112, lr=3e-3, warmup_steps=5,
                                         eval_every=0, ckpt_every=0, log_every=10, weight_decay=0.0),
                       eval_max_new_tokens=24)
    result = sft(recipe, show_progress=False)
    b = result["behavior"]
    assert b["base"]["answer_rate"] <= 0.1 and b["sft"]["answer_rate"] >= 0.8
    saved = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert saved["behavior"]["sft"]["answer_rate"] == b["sft"]["answer_rate"] and "val_loss" in saved


def test_sft_lora_saves_a_peft_adapter_that_merges_to_the_saved_model(tokenizer_dir, tmp_path):
    from athanor.model.hf import load_pretrained
    from athanor.model.lora import load_adapter, merge_lora
    from athanor.train.sft import LoraSettings

    base = tiny_base(tmp_path, tokenizer_dir)
    recipe = SFTRecipe(out_dir=str(tmp_path / "sft"), base=str(base), lora=LoraSettings(enabled=True, r=4, alpha=8),
                       data=SFTDataConfig(synth_train=60, synth_heldout=6, synth_kinds=["arithmetic"]),
                       train=TrainConfig(max_steps=4, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=1,
                                         eval_every=0, ckpt_every=0, log_every=2),
                       eval_max_new_tokens=4)
    result = sft(recipe, show_progress=False)
    assert result["trainable_parameters"] < LlamaModel(tiny_model_config()).config.num_parameters() / 5
    out = tmp_path / "sft"
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = load_pretrained(base)
    load_adapter(merged, out / "adapter")
    merge_lora(merged)
    saved = load_pretrained(out)
    x = torch.randint(0, 512, (1, 12))
    torch.testing.assert_close(merged(x), saved(x))
    assert not torch.allclose(saved(x), load_pretrained(base)(x))  # the adapter did learn something


def test_heldout_from_any_instruction_file_or_a_task_file(tmp_path):
    from athanor.data.synth import make_splits, write_tasks
    from athanor.train.sft import _as_tasks

    chat = tmp_path / "held.jsonl"
    chat.write_text(json.dumps({"instruction": "Capital of France?", "output": "Paris"}) + "\n")
    (task,) = _as_tasks(str(chat))
    assert (task.kind, task.prompt, task.completion) == ("chat", "Capital of France?", "Paris")
    _, heldout, _ = make_splits(20, 3, seed=0, kinds=["arithmetic"])
    write_tasks(heldout, tmp_path / "tasks.jsonl")
    assert _as_tasks(str(tmp_path / "tasks.jsonl")) == heldout


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sft_under_torchrun_follows_one_process(parallel, tmp_path, tokenizer_dir):
    import os
    import shutil
    import subprocess
    import sys

    base = tiny_base(tmp_path, tokenizer_dir)

    def run(out, nproc):
        args = ["-m", "athanor", "sft", "--quiet", "--base", str(base), "--out", str(out),
                "--data.synth_train=120", "--data.synth_heldout=8", "--data.synth_kinds=arithmetic",
                "--train.max_steps=6", f"--train.batch_size={4 // nproc}", "--train.seq_len=64",
                "--train.log_every=1", "--train.ckpt_every=0", f"--train.parallel={parallel}",
                "--eval_max_new_tokens=4"]
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        cmd = [sys.executable, *args] if nproc == 1 else [torchrun, "--standalone", f"--nproc_per_node={nproc}", *args]
        r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    single, multi = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert len(single) == len(multi) == 6
    assert max(abs(a - b) / a for a, b in zip(single, multi, strict=True)) < 1e-3
    from athanor.model.hf import load_pretrained

    x = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(load_pretrained(tmp_path / "two")(x), load_pretrained(tmp_path / "one")(x),
                               rtol=1e-3, atol=1e-3)
