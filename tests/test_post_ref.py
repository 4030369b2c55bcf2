"""Cross-checks of LoRA and SFT against the field's references: PEFT and TRL (skip when absent)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config
from test_lora import trained_lora
from test_sft import examples

from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel
from athanor.model.lora import LoraConfig, load_adapter, merge_lora, save_adapter
from athanor.train.sft import SFTStage, encode_examples, pack

pytestmark = pytest.mark.ref
X = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def _adapter(tmp_path, config: LoraConfig):
    """A base model saved in the HF layout and a LoRA adapter with non-zero B saved beside it."""
    base, model, info = trained_lora(config)
    save_pretrained(base, tmp_path / "base")
    save_adapter(model, info, tmp_path / "adapter", base=str(tmp_path / "base"))
    return model


@pytest.mark.parametrize("config", [LoraConfig(r=4, alpha=8),
                                    LoraConfig(r=8, alpha=4, rslora=True, target_modules=["q_proj", "down_proj"])])
def test_peft_loads_our_adapter_with_the_same_logits_and_merge(tmp_path, config):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ours = _adapter(tmp_path, config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    expected = ours.eval()(X)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(X).logits, expected, rtol=1e-5, atol=1e-5)
    peft_merged = peft_model.merge_and_unload().state_dict()
    our_merged = merge_lora(ours).state_dict()
    for name, w in our_merged.items():
        if name in peft_merged:
            torch.testing.assert_close(w, peft_merged[name], rtol=1e-6, atol=1e-6, msg=name)
    assert {n for n in peft_merged if "layers" in n} == {n for n in our_merged if "layers" in n}


def test_we_load_an_adapter_peft_saved(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    save_pretrained(LlamaModel(tiny_model_config()), tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "gate_proj"],
                                                         init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    ours = load_pretrained(tmp_path / "base")
    load_adapter(ours, tmp_path / "peft_adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), peft_model(X).logits, rtol=1e-5, atol=1e-5)


def test_sft_loss_equals_trl_on_the_same_batch(tmp_path, tokenizer, tokenizer_dir):
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    ours = LlamaModel(tiny_model_config())
    save_pretrained(ours, tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)

    enc = encode_examples(examples(), tokenizer, seq_len=100)
    # TRL's side: the same token ids and assistant masks, one padded row per conversation.
    data = datasets.Dataset.from_list([{"input_ids": e.ids, "assistant_masks": e.mask} for e in enc])
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(enc),
                         max_length=None, use_cpu=True, dataset_num_proc=None)
    trainer = trl.SFTTrainer(model=hf, args=args, train_dataset=data, processing_class=hf_tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(enc))])
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(hf, batch))
    # Ours: the conversations packed into one row with the block-diagonal mask.
    stage = SFTStage(pack(enc, 100, tokenizer.pad_id, seed=0), None, batch_size=1, seed=0)
    rows = stage.next_batch()
    with torch.no_grad():
        loss_sum, _ = stage.loss_sum(ours, rows)
    assert stage.loss_tokens(rows) == int((batch["labels"][:, 1:] != -100).sum())
    assert float(loss_sum) / stage.loss_tokens(rows) == pytest.approx(trl_loss, rel=1e-5)
