"""GGUF of checkpoints as people download them (optional `ref` group): each family's tokenizer and a
tiny transformers checkpoint of its architecture. llama.cpp (llama-cpp-python) tokenizes athanor's
export as transformers does and computes the same F32 logits; a GGUF written by llama.cpp's own
`convert_hf_to_gguf.py` imports back to the same tokens and logits.

The converter ships inside the llama-cpp-python source distribution; tests that need it skip unless
ATHANOR_CONVERT_HF_TO_GGUF names the script, e.g.
  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
  tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
  export ATHANOR_CONVERT_HF_TO_GGUF=/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py
and the converter's own requirement `sentencepiece` installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from shipped_tokenizers import build_checkpoint, corpus_texts
from test_shipped_tokenizers import HOSTILE

from athanor.model.hf import load_pretrained
from athanor.quant.gguf import export_gguf, import_gguf

transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.ref

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# family's tokenizer -> (architecture, config), as those models ship: Llama 3 untied with its RoPE
# scaling, Qwen2 with q/k/v biases, Qwen3 (Qwen's tokenizer) with q/k norms, SmolLM2 tied.
CASES = {
    "llama3": ("llama3", "LlamaConfig", dict(tie_word_embeddings=False,
                                             rope_parameters={"rope_theta": 500_000.0, **LLAMA3_ROPE})),
    "qwen2": ("qwen2", "Qwen2Config", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3": ("qwen2", "Qwen3Config", dict(tie_word_embeddings=True, head_dim=32)),
    "smollm2": ("smollm2", "LlamaConfig", dict(tie_word_embeddings=True)),
    "llama2": ("llama2", "LlamaConfig", dict(tie_word_embeddings=False)),
    # Variants of the architectures: linear RoPE scaling (rope.scaling.* keys), Llama's q/k/v/o biases
    # (q and k permuted with their rows), Qwen3 untied with KV heads = heads.
    "llama-linear-rope": ("llama3", "LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0})),
    "llama-bias": ("smollm2", "LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True)),
    "qwen3-untied": ("qwen2", "Qwen3Config", dict(tie_word_embeddings=False, num_key_value_heads=4)),
}  # Mistral's Metaspace layout is refused by export (test_gguf.py)
# The llama.cpp pre-tokenizer each byte-level family's real model gets from convert_hf_to_gguf.py
# (by the hash of its tokenization of a fixed text; a tiny vocabulary has no registered hash).
PRE_NAMES = {"llama3": "llama-bpe", "qwen2": "qwen2", "smollm2": "smollm"}
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts()


def _checkpoint(case: str, texts: list[str], out: Path) -> Path:
    """A tiny transformers checkpoint of the case's architecture with the family's tokenizer beside it;
    weights large enough that a wrong RoPE layout or norm would show."""
    family, config_class, settings = CASES[case]
    return build_checkpoint(family, config_class, settings, texts, out, max_position_embeddings=128,
                            weight_std=0.25)


def _llama(path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=2, logits_all=True,
                           type_k=0, type_v=0, verbose=False)  # type 0 = f32 KV cache


def _prompt(hf_tok) -> list[int]:
    """About 60 positions (past the llama3 case's original context of 32) of code and prose."""
    text = "def f(x):\n    return x ** 2  # the square\n" * 4 + "Hello, world! 12345 naïve café 🙂"
    return hf_tok(text)["input_ids"][:90]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0]


def _llama_cpp_differs_on(case: str, text: str) -> bool:
    """llama.cpp has no NFC normalizer (Qwen2's tokenizer.json has one): text that NFC changes is
    tokenized unnormalized there, whatever the file says."""
    return CASES[case][0] == "qwen2" and unicodedata.normalize("NFC", text) != text


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_tokenizes_and_computes_as_transformers(case: str, texts: list[str], tmp_path: Path) -> None:
    ckpt = _checkpoint(case, texts, tmp_path / "ckpt")
    export_gguf(ckpt, tmp_path / "m.gguf", "F32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    ids = _prompt(hf_tok)
    llm = _llama(tmp_path / "m.gguf")
    try:
        differ = []
        for text in HOSTILE:
            expected = hf_tok(text)["input_ids"]
            got = llm.tokenize(text.encode(), add_bos=True, special=True)
            if got != expected:
                differ.append(text)
        theirs_cpp = torch.from_numpy(np.array(_eval(llm, ids), dtype=np.float32))
    finally:
        llm.close()
    assert differ == [t for t in HOSTILE if _llama_cpp_differs_on(case, t)]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    expected = _logits(theirs, ids)
    assert (theirs_cpp - expected).abs().max().item() < LOGIT_TOL
    assert (_logits(load_pretrained(ckpt).eval(), ids) - expected).abs().max().item() < LOGIT_TOL


def _eval(llm, ids: list[int]) -> list:
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)]


def _converter() -> Path:
    script = os.environ.get("ATHANOR_CONVERT_HF_TO_GGUF")
    if not script or not Path(script).is_file():
        pytest.skip("set ATHANOR_CONVERT_HF_TO_GGUF to llama.cpp's convert_hf_to_gguf.py (see this module's doc)")
    return Path(script)


# Runs the converter as its own command line would, with one registration added: the pre-tokenizer
# name for the tiny vocabulary (what convert_hf_to_gguf_update.py does for a model it knows).
RUNNER = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import conversion.base
pre = sys.argv[2]
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
script = sys.argv[1] + "/convert_hf_to_gguf.py"
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if CASES[c][0] in PRE_NAMES])
def test_convert_hf_to_gguf_file_imports_with_the_same_tokens_and_logits(case: str, texts: list[str],
                                                                         tmp_path: Path) -> None:
    script = _converter()
    pytest.importorskip("sentencepiece")  # the converter imports it before it looks for a tokenizer.model
    ckpt = _checkpoint(case, texts, tmp_path / "ckpt")
    # The script puts its own gguf-py first on the path: it needs names newer than the released package.
    done = subprocess.run([sys.executable, "-c", RUNNER, str(script.parent), PRE_NAMES[CASES[case][0]],
                           str(ckpt), "--outtype", "f32", "--outfile", str(tmp_path / "c.gguf")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = import_gguf(tmp_path / "c.gguf", tmp_path / "back")
    original = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    back = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in HOSTILE:
        assert back(text)["input_ids"] == original(text)["input_ids"], text
    ids = _prompt(original)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    expected = _logits(theirs, ids)
    assert (_logits(load_pretrained(out).eval(), ids) - expected).abs().max().item() < LOGIT_TOL
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (_logits(reloaded, ids) - expected).abs().max().item() < LOGIT_TOL
