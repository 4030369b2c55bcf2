import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from athanor.tokenizer import CHAT_TEMPLATE, Tokenizer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "def six():\n    return 6"},
]


def test_roundtrip_any_bytes(tokenizer: Tokenizer) -> None:
    for text in ["def f(x):\n    return x  # ünïcödé ✓", "\t\n  ", "🙂 emoji and \x00 nul"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|user|>hi<|end|>")[0] == tokenizer.role_ids["user"]
    assert tokenizer.encode("<|user|>hi<|end|>")[-1] == tokenizer.end_id
    lengths = tokenizer.token_byte_lengths()
    assert lengths[tokenizer.bos_id] == 0 and sum(lengths) > tokenizer.vocab_size


def test_render_chat_matches_template_string(tokenizer: Tokenizer) -> None:
    assert tokenizer.chat.source == CHAT_TEMPLATE
    text, _ = tokenizer.chat.render(CHAT)  # rendered the way transformers renders it
    ids, mask = tokenizer.render_chat(CHAT)
    assert ids == tokenizer.encode(text) == tokenizer.encode_chat(CHAT)
    assert len(mask) == len(ids)


def test_athanor_rules_by_name(tokenizer: Tokenizer) -> None:
    assert tokenizer.add_bos and tokenizer.encode_prompt("def ") == [tokenizer.bos_id, *tokenizer.encode("def ")]
    assert tokenizer.stop_ids == sorted({tokenizer.end_id, tokenizer.eos_id, tokenizer.bos_id,
                                         *tokenizer.role_ids.values()})


def test_loss_mask_covers_exactly_assistant_replies(tokenizer: Tokenizer) -> None:
    ids, mask = tokenizer.render_chat(CHAT)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = tokenizer.encode("4") + [tokenizer.end_id] + tokenizer.encode("def six():\n    return 6") + \
        [tokenizer.end_id]
    assert learned == expected


def test_generation_prompt_and_bad_role(tokenizer: Tokenizer) -> None:
    ids, mask = tokenizer.render_chat(CHAT[:2], add_generation_prompt=True)
    assert ids[-1] == tokenizer.role_ids["assistant"] and sum(mask) == 0
    from athanor.errors import AthanorError

    with pytest.raises(AthanorError, match="role"):
        tokenizer.render_chat([{"role": "robot", "content": "x"}])


def test_saved_tokenizer_adds_bos_for_other_clients(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    # What any `tokenizers` client gets with special tokens on (its default): the BOS athanor trains with.
    plain = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert plain.encode("def ").ids == [tokenizer.bos_id, *tokenizer.encode("def ")]
    assert plain.encode("a", "b").ids == [tokenizer.bos_id, *tokenizer.encode("a"), tokenizer.bos_id,
                                          *tokenizer.encode("b")]
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False


def test_tokenizer_saved_without_bos_processor_still_loads(tmp_path: Path, tokenizer_dir: Path,
                                                           tokenizer: Tokenizer) -> None:
    old = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    old["post_processor"] = None  # as athanor saved tokenizers before the BOS post-processor
    (tmp_path / "tokenizer.json").write_text(json.dumps(old))
    loaded = Tokenizer.load(tmp_path)
    text = "def f():\n    return 1"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.fingerprint() == tokenizer.fingerprint()  # shards made with the old file stay valid
    loaded.save(tmp_path / "resaved")
    resaved = HFTokenizer.from_file(str(tmp_path / "resaved" / "tokenizer.json"))
    assert resaved.encode(text).ids == [tokenizer.bos_id, *tokenizer.encode(text)]


@pytest.mark.ref
def test_transformers_adds_bos_once(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert hf("def ")["input_ids"] == [tokenizer.bos_id, *tokenizer.encode("def ")]
    # The template starts with bos_token and transformers encodes it without special tokens: one BOS.
    assert hf.apply_chat_template(CHAT, tokenize=True, return_dict=False) == tokenizer.render_chat(CHAT)[0]
    prompt = hf.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt == tokenizer.render_chat(CHAT[:2], add_generation_prompt=True)[0]


@pytest.mark.ref
def test_transformers_loads_tokenizer_and_template(tokenizer_dir, tokenizer: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "import os\nprint(os.getcwd())  # ✓"
    assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf.bos_token == "<|bos|>" and hf.eos_token == "<|eos|>"
    rendered = hf.apply_chat_template(CHAT, tokenize=False)
    assert hf(rendered, add_special_tokens=False)["input_ids"] == tokenizer.render_chat(CHAT)[0]
