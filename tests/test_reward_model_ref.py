"""The reward model against the field's references (skip when absent): transformers loads the saved model
as AutoModelForSequenceClassification and scores alike, padded on either side; the loss and metrics equal
TRL 1.16 RewardTrainer.compute_loss on the same batch and model, with margin and centering; PEFT loads
the LoRA adapter with its score head.

TRL runs in fp32 (`bf16=False`; its config defaults to bf16 autocast) on the CPU with its defaults
otherwise (dropout disabled, right padding, EOS appended to text answers, no truncation with
`max_length=None`). Ours runs athanor's RewardModel (load_pretrained on the same checkpoint) on TRL's
collated `input_ids`, and reward_loss on TRL's `margin`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_base, tiny_model_config, toy_pairs_file

from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel
from athanor.tokenizer import Tokenizer
from athanor.train.dpo import PreferenceDataConfig
from athanor.train.finetune import LoraSettings
from athanor.train.loop import TrainConfig
from athanor.train.reward_model import RewardLossConfig, RewardModel, reward_loss
from athanor.train.rm import RMRecipe, rm

pytestmark = pytest.mark.ref
PAIRS = [{"prompt": "What is 2+2?", "chosen": " 4", "rejected": " five, I think", "margin": 0.5},
         {"prompt": "Name a colour.", "chosen": " Blue is one.", "rejected": " Seven", "margin": 0.0},
         {"prompt": "Say hello.", "chosen": " Hello there, friend.", "rejected": " No.", "margin": 2.0}]
METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


def _save_random_rm(out: Path, tokenizer_dir: Path, **config) -> Path:
    """A random tiny reward model (the score head drawn large enough that rewards differ visibly)."""
    torch.manual_seed(0)
    model = RewardModel.from_language_model(LlamaModel(tiny_model_config(**config)),
                                            Tokenizer.load(tokenizer_dir).pad_id, seed=1)
    with torch.no_grad():
        model.score.weight.mul_(50)
    save_pretrained(model, out)
    return out


@pytest.mark.parametrize("config", [{}, {"model_type": "qwen2", "tie_word_embeddings": False}],
                         ids=["llama-tied", "qwen2"])
def test_transformers_loads_the_reward_model_and_scores_alike(tmp_path: Path, tokenizer_dir: Path, config) -> None:
    transformers = pytest.importorskip("transformers")
    path = _save_random_rm(tmp_path / "rm", tokenizer_dir, **config)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    family = "Qwen2" if config else "Llama"
    assert type(theirs).__name__ == f"{family}ForSequenceClassification" and theirs.config.num_labels == 1
    ours = load_pretrained(path, model_class=RewardModel).eval()
    tok = Tokenizer.load(tokenizer_dir)
    rows = [tok.encode(text) for text in ("a short one", "a somewhat longer text to score here", "x")]
    width = max(map(len, rows))
    with torch.no_grad():
        alone = torch.cat([ours(torch.tensor([r])) for r in rows])
        right = ours(torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows]))
        torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
        for side in ("right", "left"):
            pads = [[tok.pad_id] * (width - len(r)) for r in rows]
            ids = [r + p if side == "right" else p + r for r, p in zip(rows, pads, strict=True)]
            mask = [[1] * len(r) + [0] * len(p) if side == "right" else [0] * len(p) + [1] * len(r)
                    for r, p in zip(rows, pads, strict=True)]
            hf = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.squeeze(-1)
            torch.testing.assert_close(hf, alone, rtol=0, atol=1e-4, msg=side)
    assert alone.std() > 1e-2  # the rows' scores differ: the comparison says something


def test_loss_and_metrics_equal_trl_reward_trainer(tmp_path: Path, tokenizer_dir: Path) -> None:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    path = _save_random_rm(tmp_path / "rm", tokenizer_dir)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                            per_device_train_batch_size=len(PAIRS), max_length=None, center_rewards_coefficient=0.01)
    trainer = trl.RewardTrainer(
        model=transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32),
        args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    assert batch["margin"].tolist() == [p["margin"] for p in PAIRS]
    trainer.model.train()  # TRL files the metrics under "train"
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    with torch.no_grad():
        chosen, rejected = load_pretrained(path, model_class=RewardModel)(batch["input_ids"]).chunk(2)
    loss, metrics = reward_loss(chosen, rejected, batch["margin"], RewardLossConfig(center_rewards_coefficient=0.01))
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5)
    assert 0 < trl_metrics["accuracy"] < 1  # a batch where the metrics are not trivial
    for name in METRICS:
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-7), name


def test_peft_loads_the_lora_adapter_with_its_score_head(tmp_path: Path, tokenizer_dir: Path) -> None:
    """The adapter on the base, loaded by PEFT as a SEQ_CLS adapter, scores as the merged run directory."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = tiny_base(tmp_path, tokenizer_dir)
    recipe = RMRecipe(out_dir=str(tmp_path / "rm"), base=str(base),
                      data=PreferenceDataConfig(paths=[str(toy_pairs_file(tmp_path / "p.jsonl", 8))],
                                                heldout_fraction=0.0),
                      lora=LoraSettings(enabled=True, r=4, alpha=8),
                      train=TrainConfig(max_steps=3, batch_size=4, seq_len=64, lr=3e-2, warmup_steps=1, eval_every=0,
                                        eval_tokens=0, ckpt_every=0))
    rm(recipe, show_progress=False)
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, dtype=torch.float32, num_labels=1, pad_token_id=Tokenizer.load(base).pad_id)
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "rm" / "adapter").eval()
    ours = load_pretrained(tmp_path / "rm", model_class=RewardModel).eval()
    ids = torch.tensor([Tokenizer.load(base).encode("a text to score")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits.squeeze(-1), ours(ids), rtol=0, atol=1e-4)
