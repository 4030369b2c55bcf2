"""Checkpoints as people download them, end to end: a tiny transformers model of each family saved with
its family's tokenizer, chat template and generation_config.json, then `athanor serve`, `athanor chat`,
SFT / LoRA SFT and the quantization scorecard run on the directory, and what they answer equals what
transformers computes on the same files (optional `ref` group; multi-second, so `slow` too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shipped_tokenizers import build_checkpoint, corpus_texts

from athanor.data.formats import load_examples
from athanor.model.hf import load_pretrained
from athanor.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.ref, pytest.mark.slow]

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
# case: (tokenizer family as shipped, transformers config class, config settings)
CASES = {
    "llama3": ("llama3", "LlamaConfig", dict(tie_word_embeddings=True,
                                             rope_parameters={"rope_theta": 500_000.0, **LLAMA3_ROPE})),
    "qwen2": ("qwen2", "Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("qwen2", "Qwen3Config", dict(tie_word_embeddings=True, head_dim=32)),  # q/k norms, Qwen's tokenizer
    "smollm2": ("smollm2", "LlamaConfig", dict(tie_word_embeddings=True)),
    "llama2": ("llama2", "LlamaConfig", dict(tie_word_embeddings=False)),
    "mistral-metaspace": ("mistral-metaspace", "LlamaConfig", dict(tie_word_embeddings=False)),
}
# Both Mistral's template and Qwen3's refuse or reshape a system turn; one user turn suits every family.
ASK = [{"role": "user", "content": "Write a function that adds two numbers."}]
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts()


def make_checkpoint(case: str, texts: list[str], out: Path) -> Path:
    family, config_class, settings = CASES[case]
    return build_checkpoint(family, config_class, settings, texts, out)


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, texts: list[str], tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, Path]:
    return request.param, make_checkpoint(request.param, texts, tmp_path_factory.mktemp(request.param))


class Reference:
    """transformers on the same directory: its tokenizer, its greedy generate() and its log-probs."""

    def __init__(self, path: Path) -> None:
        self.tok = transformers.AutoTokenizer.from_pretrained(str(path))
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.stops = set(Tokenizer.load(path).stop_ids)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """Greedy tokens after `prompt`, without the stop token that ends them (athanor never returns it)."""
        out = self.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=n, do_sample=False, pad_token_id=self.model.config.pad_token_id)
        new = out[0, len(prompt):].tolist()
        return new[:-1] if new and new[-1] in self.stops else new

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1."""
        lp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)
        return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_serve_answers_the_openai_client_with_transformers_numbers(checkpoint: tuple[str, Path]) -> None:
    openai = pytest.importorskip("openai")
    from serve_helpers import running_server

    case, path = checkpoint
    ref = Reference(path)
    with running_server(path) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        # Chat: the prompt is the model's own template, the reply transformers' greedy one, with its log-probs.
        prompt = ref.chat_ids(ASK)
        expected = ref.greedy(prompt, 12)
        r = client.chat.completions.create(model="m", messages=ASK, max_tokens=12, temperature=0, logprobs=True,
                                           top_logprobs=2)
        assert r.usage.prompt_tokens == len(prompt), case
        assert r.usage.completion_tokens == len(expected)
        assert r.choices[0].message.content == ref.tok.decode(expected, skip_special_tokens=True)
        got = [t.logprob for t in r.choices[0].logprobs.content]
        assert got == pytest.approx(ref.logprobs(prompt + expected)[len(prompt) - 1:], abs=1e-4)
        # Function definitions reach the template as in transformers.
        tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
            "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]
        r_tools = client.chat.completions.create(model="m", messages=ASK, tools=tools, max_tokens=6, temperature=0)
        with_tools = ref.tok.apply_chat_template(ASK, tools=tools, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        assert r_tools.usage.prompt_tokens == len(with_tools) > len(prompt)
        assert r_tools.choices[0].message.content == ref.tok.decode(ref.greedy(with_tools, 6), skip_special_tokens=True)

        # The stream: the same tokens and text (a random model emits invalid UTF-8 byte runs, which a
        # byte-fallback decoder turns into U+FFFD as a whole run: streamed text must wait for the run's end).
        chunks = list(client.chat.completions.create(model="m", messages=ASK, max_tokens=12, temperature=0,
                                                     stream=True, logprobs=True))
        streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert [t.token for t in streamed] == [t.token for t in r.choices[0].logprobs.content]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
        assert [t.logprob for t in streamed] == pytest.approx(got, abs=1e-4)
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

        # Completions: BOS as the tokenizer adds it, the greedy continuation and every log-prob.
        ids = ref.tok(PROMPT)["input_ids"]
        expected = ref.greedy(ids, 8)
        c = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True)
        assert c.usage.prompt_tokens == len(ids)
        assert c.choices[0].text == PROMPT + ref.tok.decode(expected, skip_special_tokens=True)
        want = ref.logprobs(ids + expected)
        skip = int(ids[0] == ref.tok.bos_token_id)  # an added BOS is not echoed
        lps = c.choices[0].logprobs.token_logprobs
        assert len(lps) == len(ids) - skip + len(expected)
        if not skip:
            assert lps[0] is None  # the first token of the text has nothing before it
        assert lps[1 - skip:] == pytest.approx(want, abs=1e-4)

        # A reply ends at every eos id the model ships (tokenizer_config.json and generation_config.json),
        # and at nothing else.
        stops = Tokenizer.load(path).stop_ids
        assert set(stops) >= set(ref.model.generation_config.eos_token_id if isinstance(
            ref.model.generation_config.eos_token_id, list) else [ref.model.generation_config.eos_token_id])
        for token in stops:
            forced = client.chat.completions.create(model="m", messages=ASK, max_tokens=3, temperature=0,
                                                    logit_bias={str(token): 100})
            assert forced.choices[0].finish_reason == "stop", (case, token)
            assert forced.usage.completion_tokens == 0 and forced.choices[0].message.content == ""
        other = next(i for i in range(ref.tok.vocab_size) if i not in stops)
        forced = client.completions.create(model="m", prompt=PROMPT, max_tokens=2, temperature=0,
                                           logit_bias={str(other): 100})
        assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 2


def test_chat_in_the_terminal_replies_as_transformers(checkpoint: tuple[str, Path]) -> None:
    """Two turns: the second prompt holds the first reply, rendered by the model's own template."""
    case, path = checkpoint
    ref = Reference(path)
    follow_up = "And three numbers?"
    # The terminal shows streamed text: 12 tokens reach the random Llama 2 model's invalid UTF-8 byte runs.
    first = ref.tok.decode(ref.greedy(ref.chat_ids(ASK), 12), skip_special_tokens=True)
    second_prompt = ref.chat_ids([*ASK, {"role": "assistant", "content": first},
                                  {"role": "user", "content": follow_up}])
    second = ref.tok.decode(ref.greedy(second_prompt, 12), skip_special_tokens=True)
    assert first and second
    out = subprocess.run([sys.executable, "-m", "athanor", "chat", str(path), "--temperature", "0",
                          "--max-tokens", "12"], input=f"{ASK[0]['content']}\n{follow_up}\n/quit\n",
                         capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert out.returncode == 0, out.stderr
    replies = [part.removesuffix("\nyou> ") for part in out.stdout.split("assistant> ")[1:]]
    assert replies == [first, second], case


# Single-turn conversations: every family's template can mask them from prefixes.
SFT_DATA = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(6) for b in range(4)]


def _masked_loss(run_dir: Path, data: Path) -> float:
    """Mean cross-entropy on the tokens the base model's template marks as the assistant's."""
    from athanor.train.sft import encode_examples

    tok, model = Tokenizer.load(run_dir), load_pretrained(run_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in encode_examples(load_examples(data), tok, 128):
            lp = torch.log_softmax(model(torch.tensor([e.ids[:-1]]))[0], -1)
            for i, (t, m) in enumerate(zip(e.ids[1:], e.mask[1:], strict=True)):
                if m:
                    total -= float(lp[i, t])
                    count += 1
    return total / count


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_on_the_checkpoint_learns_its_template_replies(checkpoint: tuple[str, Path], lora: bool,
                                                           tmp_path: Path) -> None:
    from athanor.train.loop import TrainConfig
    from athanor.train.sft import LoraSettings, SFTDataConfig, SFTRecipe, sft

    case, path = checkpoint
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT_DATA))
    out = tmp_path / "out"
    recipe = SFTRecipe(out_dir=str(out), base=str(path), data=SFTDataConfig(paths=[str(data)]),
                       lora=LoraSettings(enabled=lora, r=8, alpha=16.0),
                       train=TrainConfig(max_steps=15, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=2,
                                         eval_every=0, eval_tokens=0, ckpt_every=15, log_every=5, weight_decay=0.0))
    sft(recipe, show_progress=False)
    before, after = _masked_loss(path, data), _masked_loss(out, data)
    # Measured at 15 steps: full SFT from ~6.4 to ~4 nats, LoRA (r=8, frozen tied head) by ~0.3 to 0.6.
    assert after < before - (0.15 if lora else 1.0), (case, before, after)
    # The fine-tuned directory keeps what makes it the same family: template, eos list, BOS rule.
    tuned, base = Tokenizer.load(out), Tokenizer.load(path)
    assert (tuned.stop_ids, tuned.add_bos) == (base.stop_ids, base.add_bos)
    assert tuned.encode_chat(ASK) == base.encode_chat(ASK)
    assert (out / "adapter" / "adapter_config.json").is_file() == lora


def test_quantize_scorecard_runs_on_the_checkpoint(checkpoint: tuple[str, Path], tmp_path: Path) -> None:
    """The scorecard on held-out text (the directory has no token shards), with an importance matrix from
    calibration text, and the GGUF file where llama.cpp has the tokenizer (Mistral's Metaspace layout it
    has not: the scorecard is written without the file and says why)."""
    from athanor.quant.scorecard import ScorecardConfig, run_scorecard

    case, path = checkpoint
    text = tmp_path / "held_out.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n" * 40)
    cfg = ScorecardConfig(types=("Q8_0",), eval_tokens=256, seq_len=64, imatrix_tokens=256, answer_tokens=4,
                          embeddings=False)
    rows = run_scorecard(path, tmp_path / "quant", cfg, text_file=text, calib_file=text)
    reference, q8 = rows
    assert reference["perplexity"] > 1 and q8["top-1 agree %"] > 90, case
    refused = case == "mistral-metaspace"
    assert (tmp_path / "quant" / "model-Q8_0.gguf").is_file() != refused
    assert ("No GGUF files were written" in (tmp_path / "quant" / "scorecard.md").read_text()) == refused
