"""GGUF export and import with gguf-py: metadata, tokenizer, RoPE permutation, malformed files."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_model_config

from athanor.errors import AthanorError
from athanor.model.hf import save_pretrained
from athanor.model.llama import LlamaModel, apply_rope, rope_tables
from athanor.quant.gguf import export_gguf, import_gguf, load_gguf, read_gguf, rope_permute
from athanor.quant.linear import quantize_model
from athanor.tokenizer import Tokenizer


def make_run(tmp: Path, tokenizer_dir: Path, **kw) -> Path:
    """A tiny GQA model with K-quant friendly rows (multiples of 256), saved as a run directory."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    cfg.update(kw)
    model = LlamaModel(tiny_model_config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    run = tmp / "run"
    save_pretrained(model, run)
    Tokenizer.load(tokenizer_dir).save(run)
    return run


def test_rope_permutation_turns_rotate_half_into_adjacent_pairs() -> None:
    cfg = tiny_model_config(hidden_size=64, num_attention_heads=4)
    heads, hd = 4, 16
    w = torch.randn(heads * hd, 64)
    x = torch.randn(64)
    cos, sin = rope_tables(cfg)
    pos = 7
    # HF: project, then rotate halves.
    q_hf = apply_rope((w @ x).view(heads, hd), cos[pos], sin[pos])
    # llama.cpp: project with permuted rows, then rotate adjacent pairs (2i, 2i+1) by angle i.
    q = (rope_permute(w, heads) @ x).view(heads, hd // 2, 2)
    c, s = cos[pos, : hd // 2], sin[pos, : hd // 2]
    q_cpp = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], dim=-1)
    assert torch.allclose(rope_permute(q_cpp.reshape(heads * hd, 1), heads, inverse=True).view(heads, hd),
                          q_hf, atol=1e-5)
    assert torch.equal(rope_permute(rope_permute(w, heads), heads, inverse=True), w)


@pytest.mark.parametrize("scheme", ["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"])
def test_export_then_import_reproduces_athanors_quantized_model(scheme: str, tmp_path: Path,
                                                                  tokenizer_dir: Path) -> None:
    run = make_run(tmp_path, tokenizer_dir)
    path = tmp_path / f"m-{scheme}.gguf"
    info = export_gguf(run, path, scheme)
    assert path.stat().st_size == info["bytes"]
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == Tokenizer.load(run).bos_id
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    if scheme == "Q4_K_M":  # a labelled mix: tied head (token_embd) and the last layer's attn_v raised
        assert types["token_embd.weight"] == "Q6_K" and types["blk.1.attn_v.weight"] == "Q6_K"
        assert types["blk.0.attn_q.weight"] == "Q4_K"
        assert "mix" in reader.fields["athanor.quantization"].contents()
    else:
        assert types["blk.0.ffn_down.weight"] == scheme
    ids = torch.randint(0, 512, (2, 50))
    from athanor.model.hf import load_pretrained

    expected = quantize_model(load_pretrained(run).eval(), scheme)
    with torch.no_grad():
        assert torch.equal(load_gguf(path)(ids), expected(ids))
    out = import_gguf(path, tmp_path / "imported")
    text = "def f(x):\n    return x ** 2  # ok"
    assert Tokenizer.load(out).encode(text) == Tokenizer.load(run).encode(text)


def test_grouped_query_k_rows_use_the_kv_head_count(tmp_path: Path, tokenizer_dir: Path) -> None:
    run = make_run(tmp_path, tokenizer_dir, num_key_value_heads=1)
    export_gguf(run, tmp_path / "m.gguf", "F32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    k = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    from athanor.model.hf import load_pretrained

    hf_k = load_pretrained(run).model.layers[0].self_attn.k_proj.weight.detach()
    assert np.array_equal(np.asarray(k.data), rope_permute(hf_k, 1).numpy())


def _corruptions(good: bytes) -> dict[str, bytes]:
    n = len(good)
    flipped = bytearray(good)
    flipped[0:4] = b"GGXF"
    huge_count = bytearray(good)
    huge_count[16:24] = (2**62).to_bytes(8, "little")  # absurd metadata key count
    return {"truncated-header": good[:20], "truncated-half": good[: n // 2], "truncated-tail": good[:-7],
            "bad-magic": bytes(flipped), "huge-count": bytes(huge_count), "empty": b""}


def test_malformed_gguf_gives_a_clear_error(tmp_path: Path, tokenizer_dir: Path) -> None:
    run = make_run(tmp_path, tokenizer_dir)
    export_gguf(run, tmp_path / "good.gguf", "Q8_0")
    good = (tmp_path / "good.gguf").read_bytes()
    for name, data in _corruptions(good).items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(data)
        with pytest.raises(AthanorError, match=str(bad)):
            load_gguf(bad)
    with pytest.raises(AthanorError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")


def test_unsupported_tensor_type_and_architecture(tmp_path: Path) -> None:
    def write(path: Path, arch: str, qtype: str) -> None:
        w = gguf.GGUFWriter(path, arch=arch)
        for key, value in [("embedding_length", 256), ("block_count", 1), ("feed_forward_length", 256),
                           ("context_length", 64)]:
            w.add_uint32(f"{arch}.{key}", value)
        w.add_head_count(1)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_token_list([f"t{i}" for i in range(4)])
        t = gguf.GGMLQuantizationType[qtype]
        block, size = gguf.GGML_QUANT_SIZES[t]
        w.add_tensor("token_embd.weight", np.zeros((4, 256 // block * size), np.uint8), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "iq.gguf", "llama", "IQ2_XXS")
    with pytest.raises(AthanorError, match="IQ2_XXS is not supported"):
        read_gguf(tmp_path / "iq.gguf")
    write(tmp_path / "gpt2.gguf", "gpt2", "Q8_0")
    with pytest.raises(AthanorError, match="architecture 'gpt2' is not supported"):
        read_gguf(tmp_path / "gpt2.gguf")


def test_random_header_corruption_never_crashes(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Flip bytes anywhere in the metadata and tensor index: load or AthanorError, nothing else."""
    run = make_run(tmp_path, tokenizer_dir)
    export_gguf(run, tmp_path / "good.gguf", "Q4_0")
    good = (tmp_path / "good.gguf").read_bytes()
    header_end = gguf.GGUFReader(tmp_path / "good.gguf").data_offset
    rng = np.random.default_rng(0)
    for trial in range(40):
        data = bytearray(good)
        for pos in rng.integers(0, header_end, 3):
            data[pos] = int(rng.integers(0, 256))
        bad = tmp_path / f"fuzz{trial}.gguf"
        bad.write_bytes(bytes(data))
        try:
            load_gguf(bad)
        except AthanorError:
            pass
