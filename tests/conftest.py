"""Shared fixtures: a small real corpus (a slice of the stdlib), a tokenizer trained on it, tiny recipes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Never reach for the Hugging Face hub from tests (a lookup retries for ~48 s offline).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from athanor.data.corpus import DataConfig, iter_documents  # noqa: E402
from athanor.model.llama import ModelConfig  # noqa: E402
from athanor.tokenizer import Tokenizer, TokenizerConfig  # noqa: E402
from athanor.train.loop import TrainConfig  # noqa: E402
from athanor.train.pretrain import PretrainRecipe  # noqa: E402

SMALL_CORPUS = DataConfig(max_chars=400_000)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer.train((d.text for d in iter_documents(SMALL_CORPUS)),
                          TokenizerConfig(vocab_size=512, max_train_chars=400_000), show_progress=False)
    tok.save(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base.update(kw)
    return ModelConfig(**base)


def successor_model(chain: list[int], **config):
    """A tiny model that answers each token of `chain` with the next one, whatever came before: orthonormal
    embeddings for the chain, layers that add nothing to the residual stream, and an lm_head row per
    successor. Steers generation in tests without training."""
    import torch

    from athanor.model.llama import LlamaModel

    model = LlamaModel(tiny_model_config(tie_word_embeddings=False, **config)).eval()
    basis = torch.linalg.qr(torch.randn(model.config.hidden_size, len(chain)))[0].T
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[chain] = basis
        model.lm_head.weight.zero_()
        model.lm_head.weight[chain[1:]] = basis[:-1]
    return model


def tiny_base(tmp_path: Path, tokenizer_dir: Path, **config) -> Path:
    """A randomly initialized tiny model saved as a run directory with the test tokenizer: a base to fine-tune.
    `config`: changes to tiny_model_config (a longer context for long prompts)."""
    import torch

    from athanor.model.hf import save_pretrained
    from athanor.model.llama import LlamaModel

    torch.manual_seed(0)
    base = tmp_path / "base"
    save_pretrained(LlamaModel(tiny_model_config(**config)), base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((tokenizer_dir / name).read_bytes())
    return base


def toy_pairs_file(path: Path, n: int, start: int = 0, margin: float | None = None) -> Path:
    """Preference pairs on questions about different numbers; the chosen answer is always a word list, the
    rejected one symbols: a preference a tiny model can pick up and carry to held-out questions. `margin`:
    each pair's margin field (TRL's column), absent when None."""
    import json

    rows = [{"prompt": [{"role": "user", "content": f"Describe the number {i}."}],
             "chosen": [{"role": "assistant", "content": "it is a fine number"}],
             "rejected": [{"role": "assistant", "content": "#### ???? !!!!"}],
             **({} if margin is None else {"margin": margin})} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(out_dir: Path, tokenizer_dir: Path, **train_kw) -> PretrainRecipe:
    train = dict(max_steps=20, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=0,
                 eval_tokens=2048, ckpt_every=10, log_every=5)
    train.update(train_kw)
    return PretrainRecipe(out_dir=str(out_dir), tokenizer_path=str(tokenizer_dir), data=SMALL_CORPUS,
                          model=tiny_model_config(), train=TrainConfig(**train))


def recipe_overrides(tokenizer_dir: Path, **train_kw) -> list[str]:
    """The same tiny recipe as command-line overrides, for tests that run the real CLI."""
    r = tiny_recipe(Path("unused"), tokenizer_dir, **train_kw)
    out = [f"--tokenizer_path={tokenizer_dir}", f"--data.max_chars={SMALL_CORPUS.max_chars}"]
    for section in ("model", "train"):
        for k, v in vars(getattr(r, section)).items():
            if v is not None:
                out.append(f"--{section}.{k}={v}")
    return out


@pytest.fixture
def own_tempdir(monkeypatch):
    """The sandbox's temp dirs go into a fresh directory of this test's (one the sandbox's uid
    may pass through, as it may through /tmp), so the test finds its own runs and only them."""
    base = Path(tempfile.mkdtemp(prefix="athanor-test-"))
    base.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
