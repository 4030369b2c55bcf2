"""Quantized inference (module swap), the importance matrix, the scorecard and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from quant_helpers import train_tiny_run

from athanor.model.hf import load_pretrained
from athanor.model.llama import LlamaModel
from athanor.quant.formats import dequantize
from athanor.quant.imatrix import collect_imatrix
from athanor.quant.linear import QuantEmbedding, QuantLinear, QWeight, model_nbytes, quantize_model, quantize_weights
from athanor.quant.schemes import get_scheme, weight_type


def _model(**kw) -> LlamaModel:
    torch.manual_seed(0)
    cfg = dict(hidden_size=256, intermediate_size=512)
    cfg.update(kw)
    return LlamaModel(tiny_model_config(**cfg)).eval()


def test_swap_replaces_every_linear_and_shrinks_memory() -> None:
    ref = _model()
    ids = torch.randint(0, 512, (2, 30))
    sizes = {}
    for scheme in ["Q8_0", "Q4_0", "Q2_K"]:  # one per family: legacy symmetric, K-quant affine
        q = quantize_model(_model(), scheme)
        assert not any(type(m) is torch.nn.Linear for m in q.modules())
        assert isinstance(q.model.embed_tokens, QuantEmbedding)
        assert q.lm_head.qweight is q.model.embed_tokens.qweight  # tied: one quantized weight
        sizes[scheme] = model_nbytes(q)
        # The swapped model computes exactly what the float model with dequantized weights computes.
        deq = _model()
        with torch.no_grad():
            for name, w in quantize_weights(deq, scheme).items():
                deq.get_parameter(name).copy_(w.dequantize().view_as(deq.get_parameter(name)))
            assert torch.allclose(q(ids), deq(ids), atol=1e-5)
            # ...and the fused loss path (targets) uses the same quantized head.
            loss = q(ids, targets=ids)
            assert torch.allclose(loss, torch.nn.functional.cross_entropy(q(ids).view(-1, 512), ids.view(-1),
                                                                          reduction="sum"), rtol=1e-4)
    full = model_nbytes(ref)
    assert sizes["Q8_0"] < 0.3 * full and sizes["Q4_0"] < 0.6 * sizes["Q8_0"] and sizes["Q2_K"] < sizes["Q4_0"]


def test_mix_raises_head_and_chosen_layers_and_falls_back_on_short_rows() -> None:
    cfg = tiny_model_config(num_hidden_layers=8, hidden_size=256, intermediate_size=512)
    mix = get_scheme("Q4_K_M")
    assert weight_type(mix, "model.embed_tokens.weight", 256, cfg).name == "Q6_K"  # tied head
    raised = [i for i in range(8) if weight_type(mix, f"model.layers.{i}.mlp.down_proj.weight", 512, cfg).name
              == "Q6_K"]
    assert raised == [0, 3, 6, 7]  # llama.cpp's use_more_bits for 8 layers
    assert weight_type(mix, "model.layers.1.self_attn.q_proj.weight", 256, cfg).name == "Q4_K"
    assert weight_type(mix, "model.layers.1.input_layernorm.weight", 256, cfg).name == "F32"
    assert weight_type(get_scheme("Q4_K"), "model.layers.0.mlp.up_proj.weight", 64, cfg).name == "Q5_0"
    assert weight_type(get_scheme("Q6_K"), "model.layers.0.mlp.up_proj.weight", 64, cfg).name == "Q8_0"
    assert weight_type(get_scheme("Q4_0"), "model.layers.0.mlp.up_proj.weight", 48, cfg).name == "F16"


def test_imatrix_is_the_mean_squared_input_of_each_linear() -> None:
    model = _model()
    tokens = torch.randint(0, 512, (300,))
    imatrix = collect_imatrix(model, tokens, seq_len=100)
    assert len(imatrix) == 2 * 7 + 1
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for chunk in tokens.split(100):
            model(chunk.view(1, -1))
    handle.remove()
    x = torch.cat([s.reshape(-1, 512) for s in seen])
    assert torch.allclose(imatrix["model.layers.1.mlp.down_proj"], (x * x).mean(0), rtol=1e-5)


def test_quant_linear_keeps_bias() -> None:
    q = quantize_weights(_model(), "Q8_0")["model.layers.0.self_attn.q_proj.weight"]
    bias = torch.randn(q.rows)
    x = torch.randn(3, q.cols)
    w = dequantize(q.data, q.qtype, q.cols).view(q.rows, q.cols)
    assert torch.allclose(QuantLinear(QWeight(q), bias)(x), x @ w.t() + bias, atol=1e-5)


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0"])
def test_int4_kernel_matches_exact_product_within_bf16(name: str) -> None:
    """The int4 kernel path carries the same codes; its only error is bf16 rounding (scales,
    activations, outputs), and the exact weights stay available for the fused loss."""
    q = quantize_weights(_model(), name)["model.layers.0.mlp.up_proj.weight"]
    qw = QWeight(q)
    bias = torch.randn(q.rows)
    x = torch.randn(5, q.cols)
    exact = QuantLinear(qw, bias)
    fast = QuantLinear(qw, bias, kernel=True)
    if fast.kernel is None:
        pytest.skip("this torch has no int4 CPU kernel")
    want, got = exact(x), fast(x)
    err = (got - want).abs().max() / want.abs().max()
    assert 0 < err < 2e-2  # bf16 rounding, not a wrong layout (that would be O(1))
    assert torch.equal(fast.weight, exact.weight)
    m = quantize_model(_model(), name, kernel=True)
    assert model_nbytes(m) > model_nbytes(quantize_model(_model(), name))  # its packed copy is counted


@pytest.fixture(scope="module")
def run_with_text(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    return train_tiny_run(tmp_path_factory.mktemp("quantrun"), tokenizer_dir)


@pytest.mark.slow
def test_scorecard_orders_damage_by_bits(run_with_text: tuple[Path, Path], tmp_path: Path) -> None:
    from athanor.quant.scorecard import ScorecardConfig, kld_ordered, run_scorecard

    run, held = run_with_text
    cfg = ScorecardConfig(types=("Q8_0", "Q4_K_M", "Q4_0", "Q2_K"), eval_tokens=1024, seq_len=128,
                          imatrix_tokens=0, answer_tokens=4, embeddings=False)
    rows = run_scorecard(run, tmp_path, cfg, text_file=held)
    assert [r["type"] for r in rows] == ["F32 (reference)", "Q8_0", "Q4_K_M", "Q4_0", "Q2_K"]
    assert kld_ordered(rows)
    by = {r["type"]: r for r in rows}
    assert by["Q8_0"]["mean KLD"] < 1e-3 < by["Q2_K"]["mean KLD"]
    assert by["Q8_0"]["top-1 agree %"] > by["Q2_K"]["top-1 agree %"]
    assert 8.4 < by["Q8_0"]["bits/weight"] < 8.6 and 4.4 < by["Q4_0"]["bits/weight"] < 4.6
    for name in ("scorecard.md", "scorecard.json", "scorecard.png", "model-Q4_K_M.gguf"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "scorecard.md").read_text()
    assert "Q4_K_M (mix)" in md and f"{by['Q2_K']['mean KLD']:.5f}" in md


@pytest.mark.slow
def test_cli_export_import_imatrix_and_clear_errors(run_with_text: tuple[Path, Path], tmp_path: Path) -> None:
    run, held = run_with_text

    def athanor(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "athanor", "quantize", *args], capture_output=True, text=True,
                              timeout=300)

    r = athanor("imatrix", str(run), "--text", str(held), "--tokens", "1000", "--out", str(tmp_path / "im.st"))
    assert r.returncode == 0, r.stderr
    r = athanor("export", str(run), "--type", "Q4_K_M", "--imatrix", str(tmp_path / "im.st"),
                "--out", str(tmp_path / "m.gguf"))
    assert r.returncode == 0, r.stderr
    assert "mix" in r.stdout
    r = athanor("import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    back = load_pretrained(tmp_path / "back")
    assert back.config.num_key_value_heads == 2
    # The imported weights are the file's, dequantized and un-permuted: the same function as the
    # quantized model read straight from the file.
    from athanor.quant.gguf import load_gguf

    ids = torch.randint(0, back.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), load_gguf(tmp_path / "m.gguf")(ids), atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["hidden_size"] == 256
    (tmp_path / "bad.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:1000])
    r = athanor("import", str(tmp_path / "bad.gguf"))
    assert r.returncode == 2 and "bad.gguf" in r.stderr and "Traceback" not in r.stderr
    r = athanor(str(run), "--types", "Q9_9")
    assert r.returncode == 2 and "unknown quantization type" in r.stderr
    assert not (run / "quant").exists()  # nothing written for a command that failed


@pytest.mark.slow
def test_cli_export_compile_writes_the_same_file(run_with_text: tuple[Path, Path], tmp_path: Path) -> None:
    """`--compile` (torch.compile'd legacy quantizers) changes the speed, never the bytes."""
    from athanor.quant.compiled import cxx_available

    if not cxx_available():
        pytest.skip("no C++ compiler for torch.compile")
    run, _ = run_with_text
    for scheme in ("Q4_0", "Q5_1"):
        files = []
        for flags in ([], ["--compile"]):
            out = tmp_path / f"m-{scheme}{'-c' if flags else ''}.gguf"
            r = subprocess.run([sys.executable, "-m", "athanor", "quantize", "export", str(run), "--type", scheme,
                                "--out", str(out), *flags], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            files.append(out.read_bytes())
        assert files[0] == files[1]


def test_the_8b_comparison_follows_the_numbers() -> None:
    """The report once said the small model suffers more than an 8B one while its own KLD was 37x lower."""
    from athanor.quant.scorecard import LLAMA3_8B_Q4_K_M_KLD, compare_with_8b

    lower = compare_with_8b(LLAMA3_8B_Q4_K_M_KLD / 37)
    assert "37.0x below" in lower and "suffers less" in lower and "suffers more" not in lower
    higher = compare_with_8b(LLAMA3_8B_Q4_K_M_KLD * 4)
    assert "4.0x above" in higher and "suffers more" in higher
    assert "about the same" in compare_with_8b(LLAMA3_8B_Q4_K_M_KLD * 1.1)


def test_scorecard_plot_shows_negative_perplexity_changes() -> None:
    from athanor.quant.scorecard import damage_figure

    rows = [{"type": "F32 (reference)", "bits/weight": 32.0, "mean KLD": 0.0, "ppl change %": 0.0, "mix": False},
            {"type": "Q8_0", "bits/weight": 8.5, "mean KLD": 1e-4, "ppl change %": -0.8, "mix": False},
            {"type": "Q2_K", "bits/weight": 2.6, "mean KLD": 0.3, "ppl change %": 12.0, "mix": False}]
    fig = damage_figure(rows)
    ppl_axis = fig.axes[1]
    ys = sorted(float(c.get_offsets()[0][1]) for c in ppl_axis.collections)
    assert ys == [-0.8, 12.0]
    assert ppl_axis.get_ylim()[0] < -0.8


@pytest.mark.slow
def test_speedrun_scorecard_and_the_cli_default_do_not_collide(run_with_text: tuple[Path, Path],
                                                                tmp_path: Path, tokenizer: object) -> None:
    """`athanor quantize RUN` (default out RUN/quant) must leave the files the speedrun report embeds alone,
    and refuse to replace its own earlier scorecard without --force."""
    import shutil

    from conftest import SMALL_CORPUS

    from athanor.data.shards import build_shards
    from athanor.quant.scorecard import speedrun_markdown

    run = tmp_path / "run"
    shutil.copytree(run_with_text[0], run)
    build_shards(SMALL_CORPUS, tokenizer, run / "data", show_progress=False)
    md = speedrun_markdown(run)
    image = md.split("![damage vs size](", 1)[1].split(")", 1)[0]
    embedded = {p: p.read_bytes() for p in (run / Path(image).parent).iterdir()}
    assert (run / image).is_file() and "4,096 held-out tokens" in md and "not exp(that loss)" in md
    cli = [sys.executable, "-m", "athanor", "quantize", str(run), "--types", "Q8_0", "--tokens", "256",
           "--no-imatrix"]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {p: p.read_bytes() for p in (run / Path(image).parent).iterdir()} == embedded
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
