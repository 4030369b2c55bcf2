"""Tiny tokenizers laid out the way real model families ship them, built with the `tokenizers` library.

Each family keeps what matters for compatibility (model type, normalizer, split regex, ignore_merges,
byte fallback, post-processor, special tokens, tokenizer_config.json, generation_config.json) and a
real chat template from tests/data/templates; only the vocabulary is small and trained on the test corpus.

tokenizer_class is PreTrainedTokenizerFast so that transformers encodes with tokenizer.json as written:
transformers 5.x rebuilds a class it knows (GPT2Tokenizer, LlamaTokenizer) from the vocabulary and merges
with that class's own pre-tokenizer, which can differ from the file (measured here: SmolLM2's digit split
and Llama 2's Prepend normalizer on text with leading spaces). athanor follows tokenizer.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
FAMILIES = ("llama3", "qwen2", "smollm2", "llama2", "mistral-metaspace")


def _byte_level(texts: Iterable[str], split: pre_tokenizers.PreTokenizer | None, specials: list[str],
                vocab_size: int, gpt2_regex: bool = False) -> HFTokenizer:
    """`gpt2_regex`: ByteLevel also splits with GPT-2's regex (SmolLM's digits split is followed by it)."""
    hf = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None or gpt2_regex)
    hf.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence([split, byte_level])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return hf


def _sentencepiece(texts: Iterable[str], metaspace: bool, vocab_size: int) -> HFTokenizer:
    """Llama 2 / Mistral: "▁" BPE with byte fallback, as a normalizer (Llama-2-7b-hf) or Metaspace layout."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    spec = json.loads(hf.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # the byte tokens SentencePiece falls back to
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    hf = HFTokenizer.from_str(json.dumps(spec))
    if not metaspace:
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        hf.pre_tokenizer = None
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return hf


def _bos_template(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def build(family: str, texts: list[str], out: Path, vocab_size: int = 600) -> Path:
    """Write `family`'s tokenizer.json, tokenizer_config.json and generation_config.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    generation: dict = {}
    if family == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|python_tag|>"]
        hf = _byte_level(texts, pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), specials, vocab_size)
        spec = json.loads(hf.to_str())
        spec["model"]["ignore_merges"] = True
        hf = HFTokenizer.from_str(json.dumps(spec))
        hf.post_processor = _bos_template("<|begin_of_text|>", hf.token_to_id("<|begin_of_text|>"))
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        template = "meta-llama-Llama-3.2-3B-Instruct.jinja"
        generation = {"bos_token_id": 0, "eos_token_id": [1, 4, 5]}
    elif family in ("qwen2", "smollm2"):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        if family == "qwen2":
            split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated")
        else:
            split = pre_tokenizers.Digits(individual_digits=True)
        hf = _byte_level(texts, split, specials, vocab_size, gpt2_regex=family == "smollm2")
        if family == "qwen2":
            hf.normalizer = normalizers.NFC()
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        config = ({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"} if family == "qwen2"
                  else {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
        template = "Qwen-Qwen3-0.6B.jinja"
        generation = {"eos_token_id": [2, 0]} if family == "qwen2" else {}
    else:
        hf = _sentencepiece(texts, metaspace=family == "mistral-metaspace", vocab_size=vocab_size)
        hf.post_processor = _bos_template("<s>", hf.token_to_id("<s>"))
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        template = "mistralai-Mistral-Nemo-Instruct-2407.jinja"
        generation = {"eos_token_id": 2}
    hf.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config,
              "chat_template": (TEMPLATES / template).read_text()}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if generation:
        (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def corpus_texts(limit_chars: int = 150_000) -> list[str]:
    """The first documents of the test corpus, about `limit_chars` of them: what the families train on."""
    from conftest import SMALL_CORPUS

    from athanor.data.corpus import iter_documents

    out, seen = [], 0
    for doc in iter_documents(SMALL_CORPUS):
        out.append(doc.text)
        seen += len(doc.text)
        if seen > limit_chars:
            break
    return out


def build_checkpoint(family: str, config_class: str, settings: dict, texts: list[str], out: Path,
                     max_position_embeddings: int = 512, weight_std: float | None = None) -> Path:
    """transformers' own save of a random tiny model of `config_class` (a transformers config class name)
    with `family`'s tokenizer files beside it, as such checkpoints ship (its generation_config.json kept).
    Norms and biases are moved away from their init so that every part of the math shows; `weight_std`
    redraws the matrices too (large weights make attention peaked and logits of order 1-10, so a wrong
    RoPE layout shows)."""
    import torch
    import transformers

    from athanor.tokenizer import Tokenizer

    build(family, texts, out)
    tok = Tokenizer.load(out)
    generation = out / "generation_config.json"
    shipped_generation = generation.read_text() if generation.is_file() else None
    settings = {"num_key_value_heads": 2, **settings}
    cfg = getattr(transformers, config_class)(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
            elif weight_std is not None:
                p.normal_(0.0, weight_std)
    model.save_pretrained(out)
    if shipped_generation is not None:  # the family's eos list, as its checkpoints ship it
        generation.write_text(shipped_generation)
    return out
