"""Cross-check against transformers: the engine's batched greedy output equals `generate()`'s."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from serve_helpers import one_thread  # noqa: F401 (autouse fixture)

from athanor.model.hf import save_pretrained
from athanor.model.llama import LlamaModel
from athanor.serve.engine import Engine
from athanor.serve.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.ref


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_engine_greedy_equals_transformers_generate(tmp_path: Path, model_type: str) -> None:
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config(model_type=model_type, initializer_range=0.25)).eval()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [[5, 17, 33, 2, 9], [100, 3], [7] * 12 + [250, 251]]
    reqs = Engine(model, max_batch=3).generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    for prompt, req in zip(prompts, reqs, strict=True):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, pad_token_id=0)
        assert req.output_ids == out[0, len(prompt):].tolist()
