"""Byte-level BPE (GPT-2 style) trained with HF `tokenizers`, plus the chat format.

Saved as `tokenizer.json` (what `tokenizers` and transformers' fast tokenizers read) with a
`tokenizer_config.json` beside it that names the special tokens and carries the chat template,
so `AutoTokenizer.from_pretrained(run_dir).apply_chat_template(...)` renders exactly what
`Tokenizer.render_chat` renders here.

Chat format, one turn per role:

    <|bos|><|system|>You are terse.<|end|>
    <|user|>2+2?<|end|>
    <|assistant|>4<|end|>

Only the assistant's content and its closing `<|end|>` carry loss: the model learns to answer
and to stop, not to imitate users.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from athanor.errors import AthanorError
from athanor.io import atomic_write_text

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, END, *ROLES.values()]

# Jinja, as transformers' apply_chat_template expects; must render what render_chat builds.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_chars: int = 6_000_000  # BPE statistics settle long before the whole corpus


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids athanor needs by name."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise AthanorError(f"tokenizer lacks athanor's special tokens {missing}")
        self.bos_id, self.eos_id = hf.token_to_id(BOS), hf.token_to_id(EOS)
        self.pad_id, self.end_id = hf.token_to_id(PAD), hf.token_to_id(END)
        self.role_ids = {role: hf.token_to_id(tok) for role, tok in ROLES.items()}
        self.special_ids = {hf.token_to_id(t) for t in SPECIAL_TOKENS}
        if hf.post_processor is None:
            # Files saved before the BOS post-processor existed get it here, so the next save carries it.
            hf.post_processor = _bos_processor(self.bos_id)

    # -- training, saving, loading -------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], config: TokenizerConfig, show_progress: bool = True) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        # GPT-2's byte-level scheme: every byte is a symbol, so no text is ever out of vocabulary.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(_capped(texts, config.max_train_chars), trainer=trainer)
        return cls(hf)

    def save(self, out_dir: str | Path, model_max_length: int = 2048) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "tokenizer.json", self.hf.to_str(pretty=False))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            # Stated for readers that go by the config; tokenizer.json's post-processor does the adding.
            "add_bos_token": True,
            "add_eos_token": False,
            "additional_special_tokens": [END, *ROLES.values()],
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise AthanorError("tokenizer.json not found", path=file)
        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise AthanorError(f"cannot read tokenizer: {e}", path=file) from None

    # -- encoding ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id as the text it stands for (special tokens by name)."""
        return [self.hf.id_to_token(i) if i in self.special_ids else self.hf.decode([i]) for i in ids]

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for; 0 for special tokens (for bits-per-byte)."""
        vocab = self.hf.get_vocab()
        lengths = [0] * self.vocab_size
        for tok, i in vocab.items():
            # Byte-level BPE maps each byte to one printable character, so length == bytes.
            lengths[i] = 0 if i in self.special_ids else len(tok)
        return lengths

    def fingerprint(self) -> str:
        """Identifies what `encode` produces: the post-processor (never used by `encode`) is left out,
        so a tokenizer re-saved with the BOS post-processor keeps the shards made before it."""
        bare = HFTokenizer.from_str(self.hf.to_str())
        bare.post_processor = None
        return hashlib.sha256(bare.to_str().encode()).hexdigest()[:16]

    # -- chat ---------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its loss mask (1 = assistant content or its `<|end|>`).

        Built piece by piece, which tokenizes identically to encoding the template's string:
        special tokens split the text before byte-level pre-tokenization.
        """
        ids, mask = [self.bos_id], [0]
        newline = self.encode("\n")
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in ROLES:
                raise AthanorError(f"message {i} has role {role!r}; expected one of {list(ROLES)}",
                                   field="role")
            if not isinstance(content, str):
                raise AthanorError(f"message {i} has no text content", field="content")
            body = self.encode(content) + [self.end_id]
            learn = 1 if role == "assistant" else 0
            ids += [self.role_ids[role]] + body + newline
            mask += [0] + [learn] * len(body) + [0] * len(newline)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask


def _bos_processor(bos_id: int) -> processors.TemplateProcessing:
    """BOS before every sequence for other clients (transformers, lm-eval) that encode with special tokens,
    as athanor's own code does by hand (`[bos_id, *encode(text)]`); a pair gets one BOS per segment, the
    layout transformers builds from `add_bos_token`."""
    return processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                         special_tokens=[(BOS, bos_id)])


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for t in texts:
        if seen >= max_chars:
            return
        yield t
        seen += len(t)
