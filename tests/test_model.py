import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config

from athanor.model.linear_ce import linear_cross_entropy
from athanor.model.llama import KVCache, LlamaModel


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_kv_cache_matches_full_forward(model_type: str) -> None:
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config(model_type=model_type)).eval()
    ids = torch.randint(0, 512, (2, 30))
    full = model(ids)
    cache = KVCache(model.config, 2, 64)
    pieces = [model(ids[:, :11], 0, cache), model(ids[:, 11:20], 11, cache)]
    pieces += [model(ids[:, t:t + 1], t, cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=1e-4)


def test_fused_linear_cross_entropy_matches_plain() -> None:
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    t = torch.randint(0, 100, (300,))
    t[::7] = -100
    ref = F.cross_entropy(h @ w.t(), t, reduction="sum", ignore_index=-100)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ours = linear_cross_entropy(h, w, t, chunk=64)
    (ours * 0.5).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad, gh * 0.5, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, gw * 0.5, rtol=1e-4, atol=1e-6)


def test_fused_loss_without_grad_runs_only_the_logits_matmuls() -> None:
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    t = torch.randint(0, 100, (300,))
    with_grad = linear_cross_entropy(h, w, t, chunk=64)
    with torch.no_grad(), torch.profiler.profile() as prof:
        without = linear_cross_entropy(h, w, t, chunk=64)
    torch.testing.assert_close(without, with_grad.detach())
    matmuls = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    assert matmuls == 5  # one per chunk of 64 rows: no gradient products in evaluation


def test_targets_forward_equals_logits_loss() -> None:
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config(tie_word_embeddings=False))
    x = torch.randint(0, 512, (3, 16))
    y = torch.randint(0, 512, (3, 16))
    logits = model(x)
    ref = F.cross_entropy(logits.view(-1, 512), y.view(-1), reduction="sum")
    torch.testing.assert_close(model(x, targets=y), ref, rtol=1e-5, atol=1e-3)


def test_grouped_query_and_biases_shapes() -> None:
    cfg = tiny_model_config(model_type="qwen2", num_attention_heads=4, num_key_value_heads=1)
    model = LlamaModel(cfg)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (16, 64) and attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    untied = tiny_model_config(tie_word_embeddings=False, attention_bias=True)
    assert sum(p.numel() for p in LlamaModel(untied).parameters()) == untied.num_parameters()


def test_position_limit_is_an_error() -> None:
    model = LlamaModel(tiny_model_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_weights_of_another_shape_are_a_clear_error(tmp_path) -> None:
    import json

    from athanor.errors import AthanorError
    from athanor.model.hf import load_pretrained, save_pretrained

    save_pretrained(LlamaModel(tiny_model_config()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AthanorError, match=r"weights do not fit the config: model.layers.0.mlp.\w+_proj.weight is"):
        load_pretrained(tmp_path)
