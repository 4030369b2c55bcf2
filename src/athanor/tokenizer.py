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

`Tokenizer.load` also takes a tokenizer as a model ships it (Llama 3, Qwen2, SmolLM, GPT-2 byte-level
BPE; Llama 2 / Mistral "▁" BPE with byte fallback): its own special tokens, BOS rule, stop ids and Jinja
chat template (rendered by `athanor.chat_template` as transformers renders it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from athanor.chat_template import ChatTemplate, mask_from_spans
from athanor.errors import AthanorError
from athanor.io import atomic_write_text

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, END, *ROLES.values()]
# The special tokens transformers hands a chat template by name (its special_tokens_map).
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's space
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-F]{2}>")

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
    """A thin wrapper over `tokenizers.Tokenizer` with the ids athanor needs by name.

    Two kinds: athanor's own (trained here, `config` None: the fixed special tokens and chat format
    above) and a tokenizer as a model ships it (`config` is its `tokenizer_config.json`): its
    `bos_token` may be absent, its chat format is its Jinja `chat_template`, and `role_ids` is empty.
    """

    def __init__(self, hf: HFTokenizer, config: Mapping[str, Any] | None = None,
                 stop_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        self.config = None if config is None else dict(config)
        if config is None:
            self._name_athanor_tokens()
        else:
            self._name_shipped_tokens(config)
        # Every id after which a reply is over: the turn end, eos, the model's generation_config.json
        # list, and for athanor's format also a new document (bos) or a new turn (a role token).
        own = {self.bos_id, *self.role_ids.values()} if config is None else set()
        self.stop_ids = sorted({self.end_id, self.eos_id, *own, *stop_ids})
        # The model's own rule, read from what its tokenizer.json adds (what transformers follows too).
        self.add_bos = self.bos_id is not None and hf.encode("a").ids[:1] == [self.bos_id]
        # A shipped generation_config.json (eos list, sampling defaults), written back by `save` so a
        # model fine-tuned from it still stops where it did.
        self.generation_config: dict[str, Any] | None = None

    def _name_athanor_tokens(self) -> None:
        hf = self.hf
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
        self.chat = ChatTemplate(CHAT_TEMPLATE, {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})

    def _name_shipped_tokens(self, config: Mapping[str, Any]) -> None:
        names = {key: _token_text(config.get(key)) for key in _TEMPLATE_TOKEN_KEYS}
        names = {key: text for key, text in names.items() if text is not None}
        ids = {key: self._id_of(text, key) for key, text in names.items()}
        if "eos_token" not in ids:
            raise AthanorError("tokenizer_config.json names no eos_token", field="eos_token")
        self.bos_id: int | None = ids.get("bos_token")
        # A chat model's eos_token is its end of turn (Llama 3 <|eot_id|>, Qwen <|im_end|>).
        self.eos_id = self.end_id = ids["eos_token"]
        self.pad_id = ids.get("pad_token", self.eos_id)
        self.role_ids: dict[str, int] = {}
        declared = config.get("added_tokens_decoder")
        declared = declared.items() if isinstance(declared, Mapping) else ()
        self.special_ids = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special} | {
            int(i) for i, t in declared if str(i).isdigit() and isinstance(t, Mapping) and t.get("special")}
        template = config.get("chat_template")
        self.chat = ChatTemplate(template, names) if template else None

    def _id_of(self, text: str, key: str) -> int:
        i = self.hf.token_to_id(text)
        if i is None:
            raise AthanorError(f"{text!r} is not in tokenizer.json's vocabulary", field=key)
        return i

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
        if self.config is None:
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
        else:  # a shipped tokenizer's config, with a chat_template.jinja beside it folded in
            config = {**self.config, "model_max_length": model_max_length}
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        if self.generation_config is not None:
            atomic_write_text(out_dir / "generation_config.json", json.dumps(self.generation_config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """athanor's own tokenizer, or any `tokenizer.json` with the `tokenizer_config.json` (and, when
        present, `chat_template.jinja` and `generation_config.json`) a model ships beside it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise AthanorError("tokenizer.json not found", path=file)
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise AthanorError(f"cannot read tokenizer: {e}", path=file) from None
        config = _read_json(file.parent / "tokenizer_config.json")
        if all(hf.token_to_id(t) is not None for t in SPECIAL_TOKENS) and (
                config is None or _token_text(config.get("bos_token")) == BOS):
            return cls(hf)
        if config is None:
            raise AthanorError("tokenizer_config.json not found beside a tokenizer that is not athanor's "
                               "(it names the special tokens)", path=file.parent / "tokenizer_config.json")
        template = _chat_template_source(config, file.parent)
        config.pop("chat_template", None)
        if template is not None:  # one string from here on, whichever way it was shipped
            config["chat_template"] = template
        generation_file = file.parent / "generation_config.json"
        generation = _read_json(generation_file)
        eos = (generation or {}).get("eos_token_id")
        stop_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(isinstance(i, int) and 0 <= i < hf.get_vocab_size() for i in stop_ids):
            raise AthanorError(f"expected token ids, got {eos!r}", path=generation_file, field="eos_token_id")
        try:
            tok = cls(hf, config, stop_ids)
        except AthanorError as e:  # name the file the bad entry came from
            raise AthanorError(str(e), path=file.parent / "tokenizer_config.json") from None
        tok.generation_config = generation
        return tok

    # -- encoding ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """`text` as the model reads a document: with its BOS where the model's tokenizer adds one."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id as the text it stands for (special tokens by name), so that the strings of a text's ids
        join into the text (the OpenAI API's log-prob tokens and offsets rely on it)."""
        return [self.hf.id_to_token(i) if i in self.special_ids else self._piece(i) for i in ids]

    def _piece(self, i: int) -> str:
        token = self.hf.id_to_token(i)
        if self._byte_level or _BYTE_FALLBACK.fullmatch(token):
            return self.hf.decode([i])
        # SentencePiece style: decoding one token alone strips the space its "▁" stands for.
        return token.replace(SPIECE_SPACE, " ")

    @cached_property
    def stream_hold_ids(self) -> frozenset[int]:
        """Ids after which the decoded text can still change as more ids follow, so a stream must hold
        the text from them on: byte-fallback pieces (`<0xNN>`) decode as one run with the bytes after them,
        and a run that is not valid UTF-8 becomes U+FFFD byte for byte, even bytes valid on their own (so
        "u" turns into U+FFFD when 0xE2 follows); a run goes on across the special tokens decode skips.
        Empty for byte-level vocabularies, whose decoding only appends (an unfinished character decodes as
        a trailing U+FFFD, which the engine holds back anyway)."""
        if self._byte_level:
            return frozenset()
        fallback = {i for token, i in self.hf.get_vocab().items() if _BYTE_FALLBACK.fullmatch(token)}
        return frozenset(fallback | self.special_ids) if fallback else frozenset()

    @cached_property
    def _byte_level(self) -> bool:
        return _is_byte_level(self.hf)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for; 0 for special tokens (for bits-per-byte)."""
        byte_level = self._byte_level
        added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        lengths = [0] * self.vocab_size
        for tok, i in self.hf.get_vocab().items():
            if i in self.special_ids:
                continue
            if tok in added:  # added tokens are kept as their own text
                lengths[i] = len(tok.encode())
            elif byte_level:  # one printable character per byte (GPT-2's alphabet), so length == bytes
                lengths[i] = len(tok)
            elif _BYTE_FALLBACK.fullmatch(tok):  # <0xNN>: one raw byte
                lengths[i] = 1
            else:  # SentencePiece style: "▁" stands for a space
                lengths[i] = len(tok.replace(SPIECE_SPACE, " ").encode())
        return lengths

    def fingerprint(self) -> str:
        """Identifies what `encode` produces: the post-processor (never used by `encode`) is left out,
        so a tokenizer re-saved with the BOS post-processor keeps the shards made before it."""
        bare = HFTokenizer.from_str(self.hf.to_str())
        bare.post_processor = None
        return hashlib.sha256(bare.to_str().encode()).hexdigest()[:16]

    # -- chat ---------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                    tools: Sequence[Mapping[str, Any]] | None = None, **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation, without a loss mask: what serving needs, for any chat template
        (also those whose mask cannot be found, see `render_chat`)."""
        if self.config is None:
            return self.render_chat(messages, add_generation_prompt, tools, **template_kwargs)[0]
        text, _ = self._template().render(messages, add_generation_prompt, tools=tools, **template_kwargs)
        return self.encode(text)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                    tools: Sequence[Mapping[str, Any]] | None = None, **template_kwargs: Any
                    ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its loss mask (1 = the assistant's text and its end of turn).

        A shipped tokenizer renders its own chat template (with `tools` and any other template
        variables) and takes the mask from it (see `chat_template`).
        """
        if self.config is not None:
            text, spans = self._template().assistant_spans(messages, add_generation_prompt, tools=tools,
                                                           **template_kwargs)
            encoding = self.hf.encode(text, add_special_tokens=False)
            return encoding.ids, mask_from_spans(encoding.offsets, spans)
        if tools or template_kwargs:
            raise AthanorError("athanor's chat format has no tools or other template variables", field="tools")
        return self._render_athanor_chat(messages, add_generation_prompt)

    def _template(self) -> ChatTemplate:
        if self.chat is None:
            raise AthanorError("the tokenizer has no chat template", field="chat_template")
        return self.chat

    def _render_athanor_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool
                             ) -> tuple[list[int], list[int]]:
        # Built piece by piece, which tokenizes identically to encoding the template's string:
        # special tokens split the text before byte-level pre-tokenization.
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


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AthanorError(f"not valid JSON: {e}", path=file) from None
    if not isinstance(data, dict):
        raise AthanorError("expected a JSON object", path=file)
    return data


def _chat_template_source(config: Mapping[str, Any], directory: Path) -> str | None:
    """`chat_template.jinja` beside the config wins over the config's entry, as in transformers; an
    entry may also be a list of named templates, of which "default" is the chat template."""
    file = directory / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise AthanorError("expected a string or a list of named templates", path=directory / "tokenizer_config.json",
                           field="chat_template")
    return template


def _is_byte_level(hf: HFTokenizer) -> bool:
    """Whether vocabulary strings are in GPT-2's byte alphabet (Llama 3, Qwen, SmolLM, GPT-2)."""
    spec = json.loads(hf.to_str())
    return '"ByteLevel"' in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for t in texts:
        if seen >= max_chars:
            return
        yield t
        seen += len(t)
