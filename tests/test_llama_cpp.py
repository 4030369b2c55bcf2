"""Cross-checks against llama.cpp (llama-cpp-python, optional): it loads athanor's GGUF files,
tokenizes identically, computes the same logits, and quantizes no better than athanor does.

Not installed by scripts/test.sh (llama-cpp-python compiles llama.cpp, 8-20 minutes here); to run:
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \\
      pip install --no-cache-dir llama-cpp-python
  pytest -m ref tests/test_llama_cpp.py
"""

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_helpers import train_tiny_run

from athanor.model.hf import load_pretrained
from athanor.quant.formats import TYPES
from athanor.quant.gguf import export_gguf, hf_name_of, rope_permute
from athanor.quant.linear import quantize_model, quantize_weights
from athanor.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.ref

STRINGS = ["def f(x):\n    return x + 1\n", "  leading spaces\tand tabs", "héllo wörld ✓ 日本語", "a" * 40,
           "<|bos|>special<|end|> text", "x=1;y=2\r\n", "", "123456789 3.14159 -0.5e-3", "🙂 emoji"]

# Measured on this test's models (2026-11-28, llama-cpp-python 0.3.36): F32 logits differ by at most
# 4.8e-6 (f32 KV cache), top-1 identical at all 101 positions; mean KL(athanor || llama.cpp) 1e-9 for F16,
# 3e-6 to 8e-6 for Q8_0, Q4_0 and Q4_K_M, 7e-6 to 8e-6 for TQ2_0 (llama.cpp rounds activations to 8 bits
# for quantized matmuls, so quantized logits never agree exactly). The bounds leave a ~10x margin.
LOGIT_TOL = 1e-4
KLD_BOUND = {"F16": 1e-6, "Q8_0": 1e-4, "Q4_0": 1e-4, "Q4_K_M": 1e-4, "TQ2_0": 1e-4}


@pytest.fixture(scope="module", params=[2, 1], ids=["gqa-kv2", "gqa-kv1"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    return train_tiny_run(tmp_path_factory.mktemp("llamacpp"), tokenizer_dir, num_key_value_heads=request.param)


def _llama(path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=2, logits_all=True,
                           type_k=0, type_v=0, verbose=False)  # type 0 = f32 KV cache


def _their_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _held_ids(run: Path, held: Path) -> list[int]:
    tok = Tokenizer.load(run)
    return [tok.bos_id, *tok.encode(held.read_text())[:100]]


@pytest.mark.parametrize("scheme", ["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "TQ2_0"])
def test_llama_cpp_runs_athanor_gguf(scheme: str, run, tmp_path: Path) -> None:
    run_dir, held = run
    path = tmp_path / f"m-{scheme}.gguf"
    export_gguf(run_dir, path, scheme)
    tok = Tokenizer.load(run_dir)
    ids = _held_ids(run_dir, held)
    llm = _llama(path)
    try:
        for s in STRINGS:
            assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s), s
        theirs = _their_logits(llm, ids)
    finally:
        llm.close()
    model = load_pretrained(run_dir).eval()
    if scheme != "F32":
        model = quantize_model(model, scheme)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    if scheme == "F32":
        diff = (ours - theirs).abs().max().item()
        print(f"F32: max |logit difference| {diff:.2e} over {len(ids)} positions")
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))  # top-1 at every position
        assert diff < LOGIT_TOL
    else:
        lp, lq = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
        kld = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        print(f"{scheme}: mean KL(athanor || llama.cpp) {kld:.2e}, top-1 agreement {agree:.1%}")
        assert kld < KLD_BOUND[scheme], f"{scheme}: KL(athanor || llama.cpp) = {kld:.2e}"


def test_llama_cpp_runs_a_mistral_export(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A Mistral checkpoint (Llama's math) exported as llama.cpp's `llama`: the same F32 logits."""
    run_dir, held = train_tiny_run(tmp_path, tokenizer_dir, steps=0, model_type="mistral")
    export_gguf(run_dir, tmp_path / "m.gguf", "F32")
    ids = _held_ids(run_dir, held)
    llm = _llama(tmp_path / "m.gguf")
    try:
        theirs = _their_logits(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        ours = load_pretrained(run_dir).eval()(torch.tensor([ids]))[0]
    assert (ours - theirs).abs().max().item() < LOGIT_TOL


FTYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q4_0": 2, "Q8_0": 7}


@pytest.mark.parametrize("qtype", sorted(FTYPES))
def test_quantization_error_no_worse_than_llama_cpp(qtype: str, run, tmp_path: Path) -> None:
    """llama.cpp's quantizer (llama_model_quantize, pure, no imatrix) on the same F32 weights:
    athanor's total squared error over every K-quantizable matrix is at most llama.cpp's."""
    run_dir, _ = run
    export_gguf(run_dir, tmp_path / "f32.gguf", "F32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.pure = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "q.gguf").encode(),
                                        ctypes.byref(params))
    assert rc == 0
    model = load_pretrained(run_dir)
    ours = quantize_weights(model, qtype)
    state = model.state_dict()
    err_ours = err_theirs = 0.0
    compared = 0
    for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors:
        hf = hf_name_of(t.name)
        if t.tensor_type.name != qtype or hf is None:
            continue
        mine = ours[hf]
        assert mine.qtype == TYPES[qtype]
        ref = state[hf].float()
        blocks = torch.from_numpy(np.asarray(t.data).reshape(mine.rows, -1).copy())
        if ".q_proj." in hf or ".k_proj." in hf:  # llama.cpp's rows are in the GGUF (permuted) order
            heads = model.config.num_attention_heads if ".q_proj." in hf else model.config.num_key_value_heads
            blocks = rope_permute(blocks, heads, inverse=True)
        if qtype in ("Q4_0", "Q8_0"):  # the same rounding as ggml's reference: identical bytes
            assert torch.equal(blocks, mine.data)
        theirs = gguf.quants.dequantize(blocks.numpy(), t.tensor_type)
        err_theirs += float(((torch.from_numpy(theirs.reshape(ref.shape)) - ref) ** 2).sum())
        err_ours += float(((mine.dequantize().view(ref.shape) - ref) ** 2).sum())
        compared += 1
    assert compared >= 6, f"llama.cpp wrote only {compared} {qtype} tensors"
    print(f"{qtype}: RMSE ratio athanor / llama.cpp = {(err_ours / err_theirs) ** 0.5:.4f} over {compared} tensors")
    assert err_ours <= err_theirs


def test_llama_cpp_sees_the_chat_template(tmp_path: Path, tokenizer_dir: Path) -> None:
    """llama.cpp's chat takes its template and end-of-turn token from the GGUF metadata."""
    from athanor.tokenizer import CHAT_TEMPLATE

    run_dir, _ = train_tiny_run(tmp_path, tokenizer_dir, steps=0)
    export_gguf(run_dir, tmp_path / "m.gguf", "Q8_0")
    llm = _llama(tmp_path / "m.gguf")
    try:
        tok = Tokenizer.load(run_dir)
        assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
        assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == tok.end_id
        assert llm.token_bos() == tok.bos_id and llm.token_eos() == tok.eos_id
    finally:
        llm.close()
