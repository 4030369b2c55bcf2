"""A briefly trained tiny GQA model with K-quant friendly rows, for the quantization tests."""

from pathlib import Path

import torch
from conftest import SMALL_CORPUS, tiny_model_config

from athanor.data.corpus import iter_documents
from athanor.model.hf import save_pretrained
from athanor.model.llama import LlamaModel
from athanor.tokenizer import Tokenizer


def train_tiny_run(tmp: Path, tokenizer_dir: Path, steps: int = 25, **cfg) -> tuple[Path, Path]:
    """Train for a few steps (so distributions are peaked and KL divergences meaningful) and save a run
    directory; returns it and a held-out text file. Rows are multiples of 256, heads 4, KV heads 2."""
    torch.manual_seed(0)
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    shape.update(cfg)
    model = LlamaModel(tiny_model_config(**shape))
    tok = Tokenizer.load(tokenizer_dir)
    texts = [d.text for d in iter_documents(SMALL_CORPUS)]
    ids = torch.tensor(tok.encode("\n".join(texts[:40]))[:20_000])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        start = (step * 977) % (len(ids) - 65 * 4)
        batch = ids[start:start + 64 * 4 + 1]
        x, y = batch[:-1].view(4, 64), batch[1:].view(4, 64)
        loss = model(x, targets=y) / y.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp / "run"
    save_pretrained(model.eval(), run)
    tok.save(run)
    held = tmp / "held.txt"
    held.write_text("\n".join(texts[-6:])[:12_000])
    return run, held
