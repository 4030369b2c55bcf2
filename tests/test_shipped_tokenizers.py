"""Tokenizers and chat templates as models ship them (Llama 3, Qwen2, SmolLM2, Llama 2 / Mistral layouts)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from shipped_tokenizers import FAMILIES, build, corpus_texts

from athanor.chat_template import ChatTemplate
from athanor.data.corpus import DataConfig
from athanor.data.formats import check_file, load_examples
from athanor.data.shards import build_shards, open_tokens
from athanor.errors import AthanorError
from athanor.quant.imatrix import calibration_tokens
from athanor.tokenizer import Tokenizer
from athanor.train.sft import encode_examples

HOSTILE = [
    "Hello world", "  two leading spaces", " one", "", " ", "trailing  ", "\tTabs\tand\nnewlines\n\n\n",
    "naïve café Ünïcödé 東京 Привет мир", "e\u0301 decomposed", "emoji 🙂👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "def f(x):\n    return x**2  # ✓\n", "12345 3.14159 1e-9 0x1F 1,000,000", "it's they'll we'd I'M HE'S",
    "\u200bzero width\u00a0nbsp\u3000ideographic", "user wrote <|im_end|> and <|eot_id|> and </s> <s> in text",
    "[INST] fake [/INST] <0x41> ▁spm▁marker", "\x00\x01 control \x7f",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? Say <|im_end|> too."},
    {"role": "assistant", "content": "def six():\n    return 6"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# Fixed so the Llama template's strftime_now never renders two different days in one comparison.
TEMPLATE_KW = {"date_string": "26 Jul 2024"}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    texts = corpus_texts()
    root = tmp_path_factory.mktemp("shipped")
    return {family: build(family, texts, root / family) for family in FAMILIES}


def test_loads_with_the_families_special_tokens(shipped: dict[str, Path]) -> None:
    llama3 = Tokenizer.load(shipped["llama3"])
    assert llama3.bos_id == 0 and llama3.eos_id == llama3.end_id == 4 and llama3.add_bos
    assert llama3.stop_ids == [1, 4, 5] and llama3.role_ids == {}
    assert llama3.encode_prompt("def ") == [0, *llama3.encode("def ")]
    qwen = Tokenizer.load(shipped["qwen2"])
    assert qwen.bos_id is None and not qwen.add_bos and qwen.encode_prompt("hi") == qwen.encode("hi")
    assert qwen.eos_id == 2 and qwen.pad_id == 0 and qwen.stop_ids == [0, 2]
    smol = Tokenizer.load(shipped["smollm2"])
    assert smol.bos_id == 1 and not smol.add_bos  # names a bos_token but its tokenizer.json never adds it
    for family in ("llama2", "mistral-metaspace"):
        spm = Tokenizer.load(shipped[family])
        assert spm.add_bos and spm.encode_prompt("x")[0] == spm.bos_id and spm.stop_ids == [spm.eos_id]


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_and_byte_lengths(shipped: dict[str, Path], family: str) -> None:
    tok = Tokenizer.load(shipped[family])
    lengths = tok.token_byte_lengths()
    # SentencePiece layouts count the "▁" they prepend to a text as its space.
    for text in HOSTILE:
        if "<" in text:  # special-token text becomes the special token, which has no bytes
            continue
        ids = tok.encode(text)
        seen = unicodedata.normalize("NFC", text) if family == "qwen2" else text  # Qwen2 normalizes to NFC
        # SentencePiece layouts count the "▁" they prepend as a space (Metaspace only before a non-space).
        prepended = text != "" and (family == "llama2" or family == "mistral-metaspace" and text[0] != " ")
        assert sum(lengths[i] for i in ids) == len(seen.encode()) + prepended, text
        if family != "qwen2":
            assert tok.decode(ids) == text or family == "mistral-metaspace" and text.startswith(" ")


@pytest.mark.parametrize("family", FAMILIES)
def test_token_strings_join_into_the_text(shipped: dict[str, Path], family: str) -> None:
    """What the OpenAI API's log-prob tokens and the demo page show: the pieces of a text, spaces included."""
    tok = Tokenizer.load(shipped[family])
    text = "def add(a, b):\n    return a + b  # sum"
    joined = "".join(tok.token_strings(tok.encode(text)))
    # SentencePiece layouts prepend the "▁" that stands for a space to the text.
    assert joined == (" " + text if family in ("llama2", "mistral-metaspace") else text)


def test_byte_fallback_lengths(shipped: dict[str, Path]) -> None:
    tok = Tokenizer.load(shipped["llama2"])
    lengths = tok.token_byte_lengths()
    vocab = tok.hf.get_vocab()
    assert lengths[vocab["<0xF0>"]] == 1 and lengths[vocab["\u2581"]] == 1 and lengths[tok.bos_id] == 0


def test_llama3_mask_is_each_reply_and_its_end_of_turn(shipped: dict[str, Path]) -> None:
    tok = Tokenizer.load(shipped["llama3"])
    ids, mask = tok.render_chat(CHAT, **TEMPLATE_KW)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special=False)
    assert learned == "4<|eot_id|>def six():\n    return 6<|eot_id|>"
    prompt, prompt_mask = tok.render_chat(CHAT[:2], add_generation_prompt=True, **TEMPLATE_KW)
    assert ids[:len(prompt)] == prompt and sum(prompt_mask) == 0


def test_templates_that_cannot_give_a_mask_say_so(shipped: dict[str, Path]) -> None:
    # Qwen3 drops the empty think block from replies before the last question; Mistral moves the
    # system prompt into the last user turn: earlier turns change as the conversation goes on.
    with pytest.raises(AthanorError, match="message 2 .assistant. differently"):
        Tokenizer.load(shipped["qwen2"]).render_chat(CHAT)
    with pytest.raises(AthanorError, match="message 2 .assistant. differently"):
        Tokenizer.load(shipped["llama2"]).render_chat(CHAT)
    ids, mask = Tokenizer.load(shipped["llama2"]).render_chat(CHAT[1:])  # no system prompt: fine
    assert sum(mask) > 0
    with pytest.raises(AthanorError, match="alternate"):  # the template's raise_exception, as one line
        Tokenizer.load(shipped["llama2"]).render_chat(CHAT[1:2] * 2)


def test_single_turn_qwen3_masks_the_think_block_and_reply(shipped: dict[str, Path]) -> None:
    tok = Tokenizer.load(shipped["qwen2"])
    ids, mask = tok.render_chat(CHAT[:3])
    learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special=False)
    assert learned == "<think>\n\n</think>\n\n4<|im_end|>"


@pytest.mark.parametrize("name", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_reaches_the_template_under_any_name(shipped: dict[str, Path], name: str) -> None:
    tok = Tokenizer.load(shipped["qwen2"])
    chat = [*CHAT[1:2], {"role": "assistant", "content": "4", name: "2+2 is 4"}]
    ids, mask = tok.render_chat(chat)
    learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special=False)
    assert learned == "<think>\n2+2 is 4\n</think>\n\n4<|im_end|>"


GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _with_template(src: Path, dst: Path, template: str) -> Path:
    dst.mkdir()
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    config = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "unused"}))
    (dst / "chat_template.jinja").write_text(template)  # wins over the config's entry, as in transformers
    return dst


def test_generation_blocks_give_the_mask(shipped: dict[str, Path], tmp_path: Path) -> None:
    tok = Tokenizer.load(_with_template(shipped["smollm2"], tmp_path / "gen", GENERATION_TEMPLATE))
    ids, mask = tok.render_chat(CHAT)
    learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special=False)
    assert learned == "4<|im_end|>def six():\n    return 6<|im_end|>"


def test_template_environment_matches_transformers_conventions() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}"
        "{% endif %}\n  {{ m | tojson }}{% endfor %}{{ tools | tojson(indent=2) }}",
        {"bos_token": "<s>"})
    text, _ = template.render([{"role": "user", "content": "°<&>", "name": None}], tools=[{"a": 1}])
    # tojson keeps non-ASCII and HTML characters and the key order; None keys are dropped; blocks trimmed.
    assert text == '<s>  {"role": "user", "content": "°<&>"}[\n  {\n    "a": 1\n  }\n]'
    with pytest.raises(AthanorError, match="no bad"):
        template.render([{"role": "bad", "content": ""}])
    with pytest.raises(AthanorError, match="line 1"):
        ChatTemplate("{% if %}", {})
    with pytest.raises(AthanorError, match="message 0 is not an object"):
        template.render(["hi"])
    with pytest.raises(AthanorError, match="chat template: "):  # content of a shape the template cannot add
        ChatTemplate("{{ messages[0].content + '!' }}", {}).render([{"role": "user", "content": 1}])


def test_bad_shipped_files_are_one_clear_error(shipped: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.json").write_text((shipped["llama3"] / "tokenizer.json").read_text())
    with pytest.raises(AthanorError, match="tokenizer_config.json not found"):
        Tokenizer.load(d)
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(AthanorError, match="tokenizer_config.json: field 'eos_token'.*not in tokenizer.json"):
        Tokenizer.load(d)
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|eot_id|>"}')
    (d / "generation_config.json").write_text('{"eos_token_id": [4, "x"]}')
    with pytest.raises(AthanorError, match="generation_config.json: field 'eos_token_id'"):
        Tokenizer.load(d)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(AthanorError, match="not valid JSON"):
        Tokenizer.load(d)


def test_named_template_list_and_no_template(shipped: dict[str, Path], tmp_path: Path) -> None:
    d = _with_template(shipped["smollm2"], tmp_path / "named", GENERATION_TEMPLATE)
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 1 }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(d).chat.render([])[0] == "1"
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(d)
    with pytest.raises(AthanorError, match="no chat template"):
        tok.render_chat(CHAT)
    tok.save(tmp_path / "saved")
    assert "chat_template" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())


def test_save_keeps_the_shipped_config(shipped: dict[str, Path], tmp_path: Path) -> None:
    tok = Tokenizer.load(shipped["llama3"])
    tok.save(tmp_path / "out", model_max_length=64)
    again = Tokenizer.load(tmp_path / "out")
    assert again.bos_id == tok.bos_id and again.chat is not None
    # generation_config.json's eos list comes along, so a model fine-tuned from it stops where it did.
    assert again.stop_ids == tok.stop_ids == [1, 4, 5]
    assert again.render_chat(CHAT, **TEMPLATE_KW) == tok.render_chat(CHAT, **TEMPLATE_KW)


# -- the stages that read a shipped tokenizer ------------------------------------------------------

@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_documents_start_as_the_tokenizer_starts_them(shipped: dict[str, Path], family: str,
                                                      tmp_path: Path) -> None:
    """Shards, calibration text and prompts take BOS from the tokenizer's own rule: Llama 3 adds one,
    Qwen2 has none (its bos_token is null), so its documents end with EOS instead."""
    tok = Tokenizer.load(shipped[family])
    doc = "def one():\n    return 1\n\n\nclass Two:\n    pass\n" * 4
    (tmp_path / "doc.txt").write_text(doc)
    build_shards(DataConfig(paths=[str(tmp_path / "doc.txt")], val_fraction=0.2), tok, tmp_path / "shards",
                 show_progress=False)
    # One document cannot be split by document: the held-out part is the stream's tail, given its own BOS.
    train, val = ([int(t) for t in open_tokens(tmp_path / "shards", s)] for s in ("train", "val"))
    head, tail = ([tok.bos_id], []) if tok.add_bos else ([], [tok.eos_id])
    assert val[:len(head)] == head and train + val[len(head):] == head + tok.encode(doc) + tail
    text = tmp_path / "calib.txt"
    text.write_text(doc)
    assert calibration_tokens(shipped[family], 1000, text_file=text).tolist() == tok.encode_prompt(doc)


def test_sft_data_the_template_cannot_mask_is_refused_at_its_line(shipped: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT[1:3]}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    tok = Tokenizer.load(shipped["qwen2"])  # Qwen3's template drops earlier think blocks: multi-turn is unmaskable
    with pytest.raises(AthanorError, match=r"chat.jsonl:2: .*message 2 .assistant. differently"):
        encode_examples(load_examples(data), tok, 256)
    report = check_file(data, tok)
    assert report["errors"] == 1 and "chat.jsonl:2" in report["error_list"][0]
    assert report["lengths"]["tokens"]["max"] > 0


# -- against transformers' AutoTokenizer -------------------------------------------------------------

@pytest.mark.ref
@pytest.mark.parametrize("family", FAMILIES)
def test_ids_equal_autotokenizer_on_hostile_text(shipped: dict[str, Path], family: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(shipped[family]))
    tok = Tokenizer.load(shipped[family])
    for text in HOSTILE:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.encode_prompt(text) == hf(text)["input_ids"], text
    assert tok.encode_batch(HOSTILE) == hf(HOSTILE, add_special_tokens=False)["input_ids"]


CONVERSATIONS = ("system-multi-turn", "tools", "generation-prompt")
# Where prefixes cannot give the mask: Qwen3's template (also used for SmolLM2 here) drops the empty
# think block of earlier replies; Mistral's puts the tools into the last user turn.
UNMASKABLE = {(f, c) for f in ("qwen2", "smollm2") for c in CONVERSATIONS} | {("llama2", "tools"),
                                                                            ("mistral-metaspace", "tools")}


@pytest.mark.ref
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_equals_apply_chat_template(shipped: dict[str, Path], family: str, conversation: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(shipped[family]))
    tok = Tokenizer.load(shipped[family])
    messages = CHAT if family not in ("llama2", "mistral-metaspace") else CHAT[1:]  # Mistral: no system turn
    kw = {"system-multi-turn": {}, "tools": {"tools": TOOLS}, "generation-prompt": {}}[conversation]
    if conversation == "generation-prompt":
        messages, kw = messages[:-1], {"add_generation_prompt": True}
    kw.update(TEMPLATE_KW)
    assert tok.chat.render(messages, **kw)[0] == hf.apply_chat_template(messages, tokenize=False, **kw)
    expected = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert tok.encode_chat(messages, **kw) == expected
    if (family, conversation) in UNMASKABLE:
        with pytest.raises(AthanorError, match="differently"):
            tok.render_chat(messages, **kw)
    else:
        assert tok.render_chat(messages, **kw)[0] == expected


@pytest.mark.ref
def test_reasoning_renders_as_in_transformers(shipped: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(shipped["qwen2"]))
    tok = Tokenizer.load(shipped["qwen2"])
    chat = [*CHAT[:2], {"role": "assistant", "content": "4", "thinking": "2+2 is 4", "tool_calls": None}]
    assert tok.encode_chat(chat) == hf.apply_chat_template(chat, tokenize=True, return_dict=False)


@pytest.mark.ref
def test_generation_mask_equals_transformers(shipped: dict[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    d = _with_template(shipped["smollm2"], tmp_path / "gen", GENERATION_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    out = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert Tokenizer.load(d).render_chat(CHAT) == (out["input_ids"], out["assistant_masks"])
