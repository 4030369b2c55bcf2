"""A tokenizer as GGUF metadata (for llama.cpp) and back to `tokenizer.json`.

llama.cpp does not run `tokenizer.json`: it has a fixed set of tokenizers, chosen by
`tokenizer.ggml.model`, and for byte-level BPE (`gpt2`) a fixed set of pre-tokenizers (split
regexes) chosen by name in `tokenizer.ggml.pre`. A file tokenizes as transformers does only when
the tokenizer is one of those, so export reads the tokenizer's layout, names the llama.cpp
equivalent, and refuses (one error) any layout without one rather than writing a file that
splits text differently:

- byte-level BPE (Llama 3, Qwen2, SmolLM, GPT-2, athanor's own): `gpt2` with the token strings,
  the merges in rank order and the pre-tokenizer's name from `PRE_TOKENIZERS`;
- "▁" BPE with byte fallback in Llama 2's layout (a Prepend/Replace normalizer; Mistral's Metaspace
  layout is refused, see `_spm_space_prefix`): `llama` (llama.cpp's SentencePiece tokenizer), which
  merges the adjacent pair whose joined string has the highest score, so each token's score is minus
  the rank of the merge that makes it: the same order the BPE merges apply in.

Token types follow llama.cpp: 1 normal, 2 unknown, 3 control (special tokens), 4 user-defined
(added, not special), 5 unused (padding rows), 6 byte (`<0xNN>`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.tokenizer import CHAT_TEMPLATE, SPIECE_SPACE, Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """What a byte-level tokenizer.json does before BPE, as far as token ids go: its normalizers,
    its pre-tokenizer steps and whether whole words in the vocabulary skip the merges."""

    normalizers: tuple[tuple, ...]
    steps: tuple[tuple, ...]
    ignore_merges: bool


def _byte_level(use_regex: bool) -> tuple:
    return ("ByteLevel", False, use_regex)


def _split(regex: str) -> tuple:
    return ("Split", regex, "Isolated", False)


# llama.cpp's pre-tokenizer names (llama-vocab.cpp) and the tokenizer.json layouts they reproduce.
PRE_TOKENIZERS = {
    "gpt-2": PreTokenizer((), (_byte_level(True),), False),
    "llama-bpe": PreTokenizer((), (_split(_LLAMA3_SPLIT), _byte_level(False)), True),
    "qwen2": PreTokenizer((("NFC",),), (_split(_QWEN2_SPLIT), _byte_level(False)), False),
    "smollm": PreTokenizer((), (("Digits", True), _byte_level(True)), False),
}


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file (`tokenizer.ggml.*` and `tokenizer.chat_template`)."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    ids: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, pad, unk
    add_bos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


# -- tokenizer.json -> GGUF ----------------------------------------------------------------------------

def _steps(spec: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer as its list of steps (a Sequence flattened, None as no step)."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [s for part in spec.get(key, []) for s in _steps(part, key)]
    return [spec]


def _signature(step: dict[str, Any]) -> tuple:
    """The fields of one step that change token ids (offsets and other bookkeeping left out)."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return (kind, bool(step.get("add_prefix_space")), step.get("use_regex", True))
    if kind == "Split":
        pattern = step.get("pattern") or {}
        return (kind, pattern.get("Regex", pattern.get("String")), step.get("behavior"), bool(step.get("invert")))
    if kind == "Digits":
        return (kind, bool(step.get("individual_digits")))
    rest = {k: v for k, v in step.items() if k != "type"}
    return (kind, json.dumps(rest, sort_keys=True)) if rest else (kind,)


def _pre_tokenizer_name(tj: dict[str, Any], path: Path) -> str:
    found = PreTokenizer(tuple(_signature(s) for s in _steps(tj.get("normalizer"), "normalizers")),
                         tuple(_signature(s) for s in _steps(tj.get("pre_tokenizer"), "pretokenizers")),
                         bool(tj["model"].get("ignore_merges")))
    for name, known in PRE_TOKENIZERS.items():
        if found == known:
            return name
    steps = [s[0] for s in found.normalizers + found.steps]
    raise AthanorError(f"this byte-level tokenizer's normalizer/pre-tokenizer ({' + '.join(steps)}, ignore_merges="
                       f"{found.ignore_merges}) has no llama.cpp equivalent (tokenizer.ggml.pre knows "
                       f"{sorted(PRE_TOKENIZERS)}): llama.cpp would split text differently", path=path,
                       field="pre_tokenizer")


def _spm_space_prefix(tj: dict[str, Any], path: Path) -> bool:
    """Whether a "▁" BPE tokenizer puts "▁" before each text (llama.cpp's add_space_prefix). llama.cpp's
    SentencePiece tokenizer reproduces the normalizer layout of Llama 2 (Replace " " by "▁", with or
    without a Prepend("▁")), which it applies to each run of text between special tokens. A Metaspace
    pre-tokenizer (Mistral's layout) prepends only when the text does not start with a space, and with
    prepend_scheme "first" not after a special token: llama.cpp has no such rule, so it is refused."""
    norm = [_signature(s) for s in _steps(tj.get("normalizer"), "normalizers")]
    pre = _steps(tj.get("pre_tokenizer"), "pretokenizers")
    replace = ("Replace", json.dumps({"content": SPIECE_SPACE, "pattern": {"String": " "}}, sort_keys=True))
    if not pre and norm in ([replace], [("Prepend", json.dumps({"prepend": SPIECE_SPACE})), replace]):
        return len(norm) == 2
    layout = " + ".join(s.get("type", "?") for s in _steps(tj.get("normalizer"), "normalizers") + pre) or "none"
    raise AthanorError(f"this \"▁\" BPE tokenizer's layout ({layout}) has no llama.cpp equivalent: llama.cpp's "
                       "SentencePiece tokenizer follows only Llama 2's normalizer (Prepend(\"▁\") + Replace(\" \", "
                       "\"▁\")), and a Metaspace pre-tokenizer would tokenize text that starts with a space or "
                       "follows a special token differently", path=path, field="pre_tokenizer")


def vocab_from_run(run_dir: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer fields of the tokenizer in `run_dir` (athanor's or one as a model ships
    it), with unused placeholders for embedding rows past its last token."""
    path = run_dir / "tokenizer.json"
    if not path.is_file():
        raise AthanorError("tokenizer.json is missing (GGUF needs the tokenizer)", path=path)
    tok = Tokenizer.load(run_dir)
    tj = json.loads(tok.hf.to_str())
    model = tj.get("model") or {}
    decoders = [s.get("type") for s in _steps(tj.get("decoder"), "decoders")]
    if model.get("type") != "BPE":
        raise AthanorError(f"a {model.get('type')} tokenizer cannot be written to GGUF (only BPE: byte-level or "
                           "\"▁\" with byte fallback)", path=path, field="model.type")
    if "ByteLevel" in decoders:
        kind, pre = "gpt2", _pre_tokenizer_name(tj, path)
    elif model.get("byte_fallback"):
        kind, pre = "llama", None
    else:
        raise AthanorError("a BPE tokenizer that is neither byte-level nor \"▁\" with byte fallback has no llama.cpp "
                           "equivalent", path=path, field="model")
    strings: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    strings.update({i: a["content"] for i, a in added.items()})
    n = max(vocab_size, max(strings) + 1)
    tokens = [strings.get(i, f"<|unused_{i}|>") for i in range(n)]
    unk = model.get("unk_token")
    unk_id = model["vocab"].get(unk) if unk else None

    def kind_of(i: int) -> int:
        if i not in strings:
            return UNUSED
        if i == unk_id:  # before CONTROL: the unknown token is often also a special token
            return UNKNOWN
        if i in tok.special_ids or added.get(i, {}).get("special"):
            return CONTROL
        if i in added:
            return USER_DEFINED
        return BYTE if kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", tokens[i]) else NORMAL

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = GGUFVocab(kind, tokens, [kind_of(i) for i in range(n)], pre=pre, add_bos=tok.add_bos,
                      chat_template=tok.config.get("chat_template") if tok.config is not None else CHAT_TEMPLATE)
    if kind == "gpt2":
        vocab.merges = merges
    else:
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        vocab.scores = [-1.0 - rank[t] if t in rank else 0.0 for t in tokens]
        vocab.add_space_prefix = _spm_space_prefix(tj, path)
    named = {"bos": tok.bos_id, "eos": tok.eos_id, "eot": tok.end_id, "pad": tok.pad_id, "unk": unk_id}
    vocab.ids = {k: i for k, i in named.items() if i is not None}
    return vocab


def write_vocab(w: Any, vocab: GGUFVocab) -> None:
    """Add `vocab` to a `gguf.GGUFWriter`."""
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "eot": w.add_eot_token_id,
              "pad": w.add_pad_token_id, "unk": w.add_unk_token_id}
    for key, i in vocab.ids.items():
        adders[key](i)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


# -- GGUF -> tokenizer.json --------------------------------------------------------------------------

def _hf_pre_tokenizer(name: str) -> tuple[Any, Any]:
    """(normalizer, pre-tokenizer) objects for a llama.cpp pre-tokenizer name, from PRE_TOKENIZERS."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    known = PRE_TOKENIZERS[name]
    steps = []
    for step in known.steps:
        if step[0] == "ByteLevel":
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=step[1], use_regex=step[2]))
        elif step[0] == "Split":
            steps.append(pre_tokenizers.Split(Regex(step[1]), step[2].lower(), invert=step[3]))
        else:
            steps.append(pre_tokenizers.Digits(individual_digits=step[1]))
    normalizer = normalizers.NFC() if known.normalizers else None
    return normalizer, steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def write_tokenizer(vocab: GGUFVocab, out_dir: Path, source: Path) -> None:
    """tokenizer.json and tokenizer_config.json rebuilt from a GGUF's byte-level (`gpt2`) vocabulary,
    as transformers' AutoTokenizer and `apply_chat_template` and athanor's `Tokenizer.load` read them."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, processors

    if vocab.model != "gpt2":
        raise AthanorError(f"a {vocab.model!r} tokenizer cannot be rebuilt as tokenizer.json (only byte-level BPE, "
                           "tokenizer.ggml.model=gpt2)", path=source, field="tokenizer.ggml.model")
    if vocab.pre not in PRE_TOKENIZERS:
        raise AthanorError(f"pre-tokenizer {vocab.pre!r} is not one athanor can rebuild (known: "
                           f"{sorted(PRE_TOKENIZERS)})", path=source, field="tokenizer.ggml.pre")
    tokens, types = vocab.tokens, vocab.types or [NORMAL] * len(vocab.tokens)
    added = [i for i, ty in enumerate(types) if ty in (CONTROL, USER_DEFINED)]
    # Added tokens also go in the BPE vocabulary: that is how tokenizers keeps their ids (they are
    # split off before the model runs, so the model never produces them).
    base = [i for i in range(len(tokens)) if types[i] != UNUSED]
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    try:
        hf = HFTokenizer(models.BPE(vocab={tokens[i]: i for i in base}, merges=merges,
                                    ignore_merges=PRE_TOKENIZERS[vocab.pre].ignore_merges))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. a merge of tokens not in the vocabulary
        raise AthanorError(f"the tokenizer's vocabulary and merges disagree ({e})", path=source,
                           field="tokenizer.ggml.merges") from None
    normalizer, hf.pre_tokenizer = _hf_pre_tokenizer(vocab.pre)
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.decoder = decoders.ByteLevel()
    spec = json.loads(hf.to_str())
    spec["added_tokens"] = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": types[i] == CONTROL} for i in added]
    hf = HFTokenizer.from_str(json.dumps(spec))
    bos = vocab.ids.get("bos")
    if vocab.add_bos and bos is not None:
        hf.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                          pair=f"{tokens[bos]} $A {tokens[bos]}:1 $B:1",
                                                          special_tokens=[(tokens[bos], bos)])
    atomic_write_text(out_dir / "tokenizer.json", hf.to_str(pretty=False))
    named: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                             "add_bos_token": vocab.add_bos, "bos_token": None}
    for key in ("bos", "eos", "pad", "unk"):
        i = vocab.ids.get(key)
        if i is not None and 0 <= i < len(tokens):
            named[f"{key}_token"] = tokens[i]
    special = [i for i in added if types[i] == CONTROL]
    named["additional_special_tokens"] = [tokens[i] for i in special if tokens[i] not in named.values()]
    named["added_tokens_decoder"] = {str(i): {"content": tokens[i], "special": types[i] == CONTROL,
                                              "normalized": False, "lstrip": False, "rstrip": False,
                                              "single_word": False} for i in added}
    if vocab.chat_template:
        named["chat_template"] = vocab.chat_template
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(named, indent=2) + "\n")
    stops = sorted({vocab.ids[k] for k in ("eos", "eot") if k in vocab.ids})
    if stops:  # llama.cpp stops on end-of-turn as well as eos: transformers reads that list here
        atomic_write_text(out_dir / "generation_config.json", json.dumps({"eos_token_id": stops}) + "\n")
