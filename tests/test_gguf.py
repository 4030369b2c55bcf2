"""GGUF export and import with gguf-py: metadata, tokenizer, RoPE permutation, malformed files."""

import json
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


def test_export_writes_the_chat_template_and_special_ids(tmp_path: Path, tokenizer_dir: Path) -> None:
    """llama.cpp's chat reads `tokenizer.chat_template` and the BOS/EOS/EOT ids from the file."""
    from athanor.tokenizer import CHAT_TEMPLATE

    run = make_run(tmp_path, tokenizer_dir)
    export_gguf(run, tmp_path / "m.gguf", "Q8_0")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    tok = Tokenizer.load(run)
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_id
    assert fields["tokenizer.ggml.padding_token_id"].contents() == tok.pad_id
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tok.end_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True


def test_import_restores_the_chat_template_and_special_tokens(tmp_path: Path, tokenizer_dir: Path) -> None:
    import json

    run = make_run(tmp_path, tokenizer_dir)
    export_gguf(run, tmp_path / "m.gguf", "F32")
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    original = json.loads((run / "tokenizer_config.json").read_text())
    back = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("chat_template", "bos_token", "eos_token", "pad_token"):
        assert back[key] == original[key], key
    assert sorted(back["additional_special_tokens"]) == sorted(original["additional_special_tokens"])
    tok = Tokenizer.load(run)
    assert {int(i) for i in back["added_tokens_decoder"]} == tok.special_ids
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert Tokenizer.load(out).render_chat(chat) == tok.render_chat(chat)


@pytest.mark.ref
def test_transformers_applies_the_imported_chat_template(tmp_path: Path, tokenizer_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    run = make_run(tmp_path, tokenizer_dir)
    export_gguf(run, tmp_path / "m.gguf", "F32")
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "def f(x):"}]
    ids = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == Tokenizer.load(run).render_chat(chat, add_generation_prompt=True)[0]
    assert theirs.bos_token == "<|bos|>" and theirs.eos_token == "<|eos|>" and theirs.pad_token == "<|pad|>"


def _athanor(*args: str | Path) -> tuple[int, str]:
    """`athanor quantize ...` through the real CLI entry point: exit code and stderr."""
    import contextlib
    import io

    from athanor.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["quantize", *map(str, args)])
    return code, err.getvalue()


def _one_error_line(code: int, stderr: str, *words: str) -> None:
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("athanor: error: ") and "Traceback" not in stderr, stderr
    for w in words:
        assert w in stderr, stderr


def _patch_field(path: Path, key: str, value: int) -> None:
    """Overwrite one integer metadata value in place (the file is otherwise intact)."""
    field = gguf.GGUFReader(path, "r+").fields[key]
    field.parts[field.data[0]][0] = value


def test_import_of_a_bad_file_is_one_error_and_writes_nothing(tmp_path: Path, tokenizer_dir: Path) -> None:

    # Vocabulary and merges that disagree: the last merge overwritten in place (same length) by two
    # strings that are not tokens (DEL is outside the byte-level alphabet).
    run = make_run(tmp_path, tokenizer_dir)
    export_gguf(run, tmp_path / "merges.gguf", "F32")
    merges = gguf.GGUFReader(tmp_path / "merges.gguf", "r+").fields["tokenizer.ggml.merges"]
    last = merges.parts[merges.data[-1]]
    last[:] = np.frombuffer(b"\x7f " + b"\x7f" * (len(last) - 2), np.uint8)
    # K rows that do not split into the KV heads: 6 heads of 32, 2 KV heads (64 K rows), told 3.
    (tmp_path / "b").mkdir()
    run6 = make_run(tmp_path / "b", tokenizer_dir, hidden_size=192, num_attention_heads=6, num_key_value_heads=2)
    export_gguf(run6, tmp_path / "kheads.gguf", "F32")
    _patch_field(tmp_path / "kheads.gguf", "llama.attention.head_count_kv", 3)
    # Truncated: the last tensor cut short.
    good = (tmp_path / "merges.gguf").read_bytes()
    (tmp_path / "short.gguf").write_bytes(good[:-100])
    cases = {"merges.gguf": ("vocabulary and merges disagree",), "kheads.gguf": ("blk.0.attn_k.weight", "3 heads"),
             "short.gguf": ("truncated",)}
    for name, words in cases.items():
        out = tmp_path / f"out-{name}"
        _one_error_line(*_athanor("import", tmp_path / name, "--out", out), str(tmp_path / name), *words)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{name}")]  # no temporary left


def test_quantize_writers_refuse_to_replace_without_force(tmp_path: Path, tokenizer_dir: Path) -> None:
    run = make_run(tmp_path, tokenizer_dir)
    gguf_path = tmp_path / "m.gguf"
    assert _athanor("export", run, "--type", "F32", "--out", gguf_path)[0] == 0
    before = gguf_path.read_bytes()
    _one_error_line(*_athanor("export", run, "--type", "Q8_0", "--out", gguf_path), "--force", str(gguf_path))
    assert gguf_path.read_bytes() == before
    # Importing into an existing run directory (its weights and tokenizer) is refused ...
    weights = (run / "model.safetensors").read_bytes()
    _one_error_line(*_athanor("import", gguf_path, "--out", run), "not empty", "--force")
    assert (run / "model.safetensors").read_bytes() == weights
    # ... and replaces it only with --force.
    (run / "stray.txt").write_text("x")
    assert _athanor("import", gguf_path, "--out", run, "--force")[0] == 0
    assert not (run / "stray.txt").exists() and (run / "tokenizer_config.json").is_file()
    # The importance matrix and the scorecard directory refuse before any work.
    (tmp_path / "im.st").write_bytes(b"mine")
    _one_error_line(*_athanor("imatrix", run, "--out", tmp_path / "im.st"), "--force")
    assert (tmp_path / "im.st").read_bytes() == b"mine"
    (run / "quant").mkdir()
    (run / "quant" / "scorecard.md").write_text("mine")
    _one_error_line(*_athanor(run, "--types", "Q8_0"), "--force", str(run / "quant"))
    assert (run / "quant" / "scorecard.md").read_text() == "mine"


# -- checkpoints as people download them (tokenizers and architectures of each family) -----------------

def _family_run(tmp: Path, family: str, **cfg) -> Path:
    """A tiny athanor model of `cfg`'s architecture with `family`'s tokenizer as shipped beside it."""
    import shutil

    from conftest import SMALL_CORPUS
    from shipped_tokenizers import build

    from athanor.data.corpus import iter_documents

    texts = [d.text for _, d in zip(range(40), iter_documents(SMALL_CORPUS), strict=False)]
    tok_dir = build(family, texts, tmp / f"tok-{family}", vocab_size=400)
    run = tmp / f"run-{family}"
    torch.manual_seed(0)
    save_pretrained(LlamaModel(tiny_model_config(vocab_size=Tokenizer.load(tok_dir).vocab_size, **cfg)).eval(), run)
    for f in tok_dir.iterdir():
        shutil.copy(f, run / f.name)
    return run


@pytest.mark.parametrize("family,arch,pre", [("llama3", "llama", "llama-bpe"), ("qwen2", "qwen2", "qwen2"),
                                             ("qwen2", "qwen3", "qwen2"), ("smollm2", "llama", "smollm")])
def test_byte_level_families_name_their_pre_tokenizer_and_round_trip(family: str, arch: str, pre: str,
                                                                     tmp_path: Path) -> None:
    from test_shipped_tokenizers import HOSTILE

    rope = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32}, "rope_theta": 5e5} if family == "llama3" else {}
    run = _family_run(tmp_path, family, model_type=arch, tie_word_embeddings=arch != "llama", **rope)
    export_gguf(run, tmp_path / "m.gguf", "F32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields, names = reader.fields, {t.name for t in reader.tensors}
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.ggml.pre"].contents() == pre
    tok = Tokenizer.load(run)
    assert fields["tokenizer.ggml.add_bos_token"].contents() == tok.add_bos
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_id
    assert fields["tokenizer.chat_template"].contents() == tok.chat.source
    assert ("blk.0.attn_q_norm.weight" in names) == (arch == "qwen3")
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert ("rope_freqs.weight" in names) == (family == "llama3")
    assert ("output.weight" in names) == (arch == "llama")
    back = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    again = Tokenizer.load(back)
    assert [again.encode_prompt(t) for t in HOSTILE] == [tok.encode_prompt(t) for t in HOSTILE]
    ids = torch.randint(0, tok.vocab_size, (1, 60))
    from athanor.model.hf import load_pretrained

    with torch.no_grad():
        assert torch.allclose(load_pretrained(back)(ids), load_pretrained(run)(ids), atol=1e-5)


def test_llama2_layout_is_written_as_sentencepiece(tmp_path: Path) -> None:
    run = _family_run(tmp_path, "llama2")
    export_gguf(run, tmp_path / "m.gguf", "F32")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    tok = Tokenizer.load(run)
    vocab = tok.hf.get_vocab()
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    types, scores = fields["tokenizer.ggml.token_type"].contents(), fields["tokenizer.ggml.scores"].contents()
    assert types[vocab["<0x41>"]] == 6 and types[vocab["<unk>"]] == 2 and types[tok.bos_id] == 3
    first_merge = "".join(json.loads((run / "tokenizer.json").read_text())["model"]["merges"][0])
    assert scores[vocab[first_merge]] == max(scores[i] for i, t in enumerate(types) if t == 1 and scores[i] != 0)
    with pytest.raises(AthanorError, match="'llama' tokenizer cannot be rebuilt"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "back")


def test_export_refuses_what_llama_cpp_cannot_reproduce(tmp_path: Path) -> None:
    """One error each, and no file: Mistral's Metaspace layout, a byte-level split llama.cpp has no
    name for, Qwen3's attention output bias, Llama 3's RoPE scaling on a Qwen."""
    out = tmp_path / "m.gguf"
    mistral = _family_run(tmp_path, "mistral-metaspace")
    with pytest.raises(AthanorError, match="Metaspace"):
        export_gguf(mistral, out)
    _one_error_line(*_athanor("export", mistral, "--type", "F32", "--out", out), "Metaspace", "no llama.cpp equivalent")
    run = _family_run(tmp_path, "llama3")
    tj = json.loads((run / "tokenizer.json").read_text())
    tj["model"]["ignore_merges"] = False  # Llama 3's regex without ignore_merges: no llama.cpp name
    (run / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(AthanorError, match="field 'pre_tokenizer'.*no llama.cpp equivalent"):
        export_gguf(run, out)
    (tmp_path / "q3").mkdir()
    with pytest.raises(AthanorError, match="qwen3 model with attention_bias"):
        export_gguf(_family_run(tmp_path / "q3", "qwen2", model_type="qwen3", attention_bias=True), out)
    (tmp_path / "q2").mkdir()
    with pytest.raises(AthanorError, match="'llama3' on a qwen2 model"):
        export_gguf(_family_run(tmp_path / "q2", "qwen2", model_type="qwen2", rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}), out)
    assert not out.exists()


def test_mistral_is_written_as_llama(tmp_path: Path, tokenizer_dir: Path) -> None:
    """llama.cpp has no architecture of Mistral's own (its convert_hf_to_gguf.py writes it as `llama`):
    the file says llama, with the llama rows' RoPE permutation, and reads back to the same logits."""
    from athanor.model.hf import load_pretrained

    run = make_run(tmp_path, tokenizer_dir, model_type="mistral", tie_word_embeddings=False)
    export_gguf(run, tmp_path / "m.gguf", "F32")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "llama"
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert torch.equal(load_gguf(tmp_path / "m.gguf")(ids), load_pretrained(run)(ids))


def test_llama_biases_are_permuted_like_their_rows(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Llama with attention_bias: q and k biases are laid out per head as their weight rows are."""
    run = make_run(tmp_path, tokenizer_dir, attention_bias=True)
    from athanor.model.hf import load_pretrained

    model = load_pretrained(run).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    save_pretrained(model, run)
    export_gguf(run, tmp_path / "m.gguf", "F32")
    k = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.attn_k.bias")
    bias = model.model.layers[0].self_attn.k_proj.bias.detach()
    assert np.array_equal(np.asarray(k.data), rope_permute(bias, 2).numpy())
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert torch.equal(load_gguf(tmp_path / "m.gguf")(ids), model(ids))
