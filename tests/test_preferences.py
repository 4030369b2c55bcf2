"""Preference pairs: every TRL form reads to the same pair, every bad record is one line naming file, line and
field, and a pair's tokens carry the same assistant mask as SFT's render of the conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import athanor

from athanor.data.formats import check_file
from athanor.data.preferences import PreferencePair, encode_pair, load_pairs, to_pair
from athanor.errors import AthanorError

USER = {"role": "user", "content": "Capital of France?"}
PARIS, LYON = {"role": "assistant", "content": "Paris"}, {"role": "assistant", "content": "Lyon"}
FORMS = {  # the same preference in each of TRL's forms
    "standard": {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    "conversational": {"prompt": [USER], "chosen": [PARIS], "rejected": [LYON]},
    "conversational_implicit": {"chosen": [USER, PARIS], "rejected": [USER, LYON]},
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def parts(pair: PreferencePair) -> tuple:
    return pair.prompt, pair.chosen, pair.rejected, pair.margin


def test_every_form_reads_to_the_same_pair(tmp_path: Path) -> None:
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", list(FORMS.values())))
    assert [p.format for p in pairs] == list(FORMS) and [p.line for p in pairs] == [1, 2, 3]
    assert [parts(p) for p in pairs] == [([USER], [PARIS], [LYON], None)] * 3
    array = tmp_path / "p.json"
    array.write_text(json.dumps(list(FORMS.values())))
    assert [parts(p) for p in load_pairs(array)] == [parts(p) for p in pairs]


def test_implicit_prompts_are_the_shared_start(tmp_path: Path) -> None:
    text = to_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "f", 1)
    assert parts(text) == ([{"role": "user", "content": "The sky is"}], [{"role": "assistant", "content": " blue."}],
                           [{"role": "assistant", "content": " green."}], None)
    system = {"role": "system", "content": "Be brief."}
    earlier = [system, USER, PARIS, {"role": "user", "content": "And of Italy?"}]
    multi = to_pair({"chosen": earlier + [{"role": "assistant", "content": "Rome"}],
                     "rejected": earlier + [{"role": "assistant", "content": "Milan"}]}, "f", 1)
    assert multi.prompt == earlier and multi.chosen == [{"role": "assistant", "content": "Rome"}]


def test_margin_given_or_from_scores() -> None:
    assert to_pair({**FORMS["standard"], "margin": 2}, "f", 1).margin == 2.0
    assert to_pair({**FORMS["standard"], "score_chosen": 8.5, "score_rejected": 3}, "f", 1).margin == 5.5
    assert to_pair({**FORMS["standard"], "margin": 1, "score_chosen": 9, "score_rejected": 3}, "f", 1).margin == 1.0


@pytest.mark.parametrize("record, where", [
    ({"prompt": "q", "chosen": "a"}, "field 'rejected': missing"),
    ({"prompt": "q", "chosen": "a", "rejected": 5}, "field 'rejected': a int, not text"),
    ({"prompt": [USER], "chosen": "Paris", "rejected": "Lyon"}, "field 'prompt': a list, not text"),
    ({"prompt": [USER], "chosen": [PARIS], "rejected": []}, "field 'rejected': must be a non-empty list of turns"),
    ({"prompt": [USER], "chosen": [{"role": "robot", "content": "x"}], "rejected": [LYON]},
     "field 'chosen[0].role': unknown role 'robot'"),
    ({**FORMS["standard"], "margin": "big"}, "field 'margin': must be a finite number, got 'big'"),
    ({**FORMS["standard"], "margin": float("nan")}, "field 'margin': must be a finite number, got nan"),
    ({**FORMS["standard"], "score_chosen": 3}, "field 'score_chosen': score_chosen is given without the other"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen': empty answer"),
    ({"prompt": [USER], "chosen": [PARIS], "rejected": [{"role": "assistant", "content": ""}]},
     "field 'rejected': empty answer"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "field 'rejected': chosen and rejected are the same"),
    ({"chosen": [USER, PARIS], "rejected": [USER, PARIS]}, "field 'rejected': chosen and rejected are the same"),
    ({"chosen": [USER, PARIS], "rejected": [{"role": "user", "content": "Capital of Italy?"}, LYON]},
     "field 'rejected[0]': no prompt: without a `prompt` field, chosen and rejected must be whole conversations"),
    ({"chosen": "Paris", "rejected": "Lyon"}, "field 'rejected': no prompt: without a `prompt` field"),
    ({"prompt": [USER], "chosen": [USER, PARIS], "rejected": [LYON]},
     "field 'chosen[0].role': an answer turn must be the assistant's, not the user's"),
    ({"chosen": [USER, PARIS, USER, PARIS], "rejected": [USER, PARIS, {"role": "user", "content": "?"}, LYON]},
     "field 'chosen[2].role': an answer turn must be the assistant's, not the user's"),
    ([1, 2], "a record must be a JSON object, got list"),
    ('{"prompt": "q", "chosen": "a"', "not valid JSON"),
])
def test_bad_pairs_name_file_line_and_field(tmp_path: Path, record, where: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [FORMS["standard"], record])
    with pytest.raises(AthanorError) as e:
        load_pairs(path)
    assert str(e.value).startswith(f"{path}:2: {where}")
    report = check_file(path)  # the same line, once, among the counts
    assert report["kind"] == "preference pairs" and report["examples"] == 1
    assert report["errors"] == 1 and report["error_list"][0].startswith(f"{path}:2: {where}")


def test_parquet_reads_like_jsonl(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = [{**FORMS["conversational"], "margin": 1.5}, {**FORMS["conversational_implicit"], "margin": None}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")  # the second row's prompt is null
    pairs = load_pairs(tmp_path / "p.parquet")
    assert [parts(p) for p in pairs] == [([USER], [PARIS], [LYON], 1.5), ([USER], [PARIS], [LYON], None)]
    assert [(p.line, p.format) for p in pairs] == [(1, "conversational"), (2, "conversational_implicit")]
    bad = [records[0], {**FORMS["conversational"], "rejected": [PARIS], "margin": 0.0}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(AthanorError, match=f"^{tmp_path}/bad.parquet:2: field 'rejected': chosen and rejected"):
        load_pairs(tmp_path / "bad.parquet")


def masked(ids: list[int], mask: list[int]) -> list[int]:
    return [t for t, m in zip(ids, mask, strict=True) if m]


def test_mask_covers_exactly_the_answer(tokenizer) -> None:
    earlier = [{"role": "system", "content": "Be brief."}, USER, PARIS, {"role": "user", "content": "And Italy?"}]
    pair = to_pair({"prompt": earlier, "chosen": [{"role": "assistant", "content": "Rome"}],
                    "rejected": [{"role": "assistant", "content": "Milan, I think"}], "margin": 0.5}, "f", 1)
    enc = encode_pair(tokenizer, pair)
    assert enc.prompt_ids == tokenizer.render_chat(earlier, add_generation_prompt=True)[0]
    for answer, ids, mask in (("Rome", enc.chosen_ids, enc.chosen_mask),
                              ("Milan, I think", enc.rejected_ids, enc.rejected_mask)):
        full, full_mask = tokenizer.render_chat(earlier + [{"role": "assistant", "content": answer}])
        assert enc.prompt_ids + ids == full
        assert masked(ids, mask) == tokenizer.encode(answer) + [tokenizer.end_id]
        assert sum(full_mask) > sum(mask)  # the prompt's earlier assistant turn carries no loss here
    assert enc.margin == 0.5


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from shipped_tokenizers import build, corpus_texts

    from athanor.tokenizer import Tokenizer

    texts, root = corpus_texts(20_000), tmp_path_factory.mktemp("shipped")
    return {family: Tokenizer.load(build(family, texts, root / family)) for family in ("llama3", "llama2")}


def test_mask_with_a_shipped_template(shipped: dict) -> None:
    llama3 = shipped["llama3"]
    pair = to_pair(FORMS["conversational_implicit"], "f", 1)
    enc = encode_pair(llama3, pair)
    assert llama3.decode(enc.prompt_ids, skip_special=False).endswith(
        "Capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.decode(masked(enc.chosen_ids, enc.chosen_mask), skip_special=False) == "Paris<|eot_id|>"
    assert llama3.decode(masked(enc.rejected_ids, enc.rejected_mask), skip_special=False) == "Lyon<|eot_id|>"
    full, full_mask = llama3.render_chat([USER, PARIS])
    assert enc.prompt_ids + enc.chosen_ids == full and [0] * len(enc.prompt_ids) + enc.chosen_mask == full_mask


def test_an_answer_that_merges_into_the_prompt_tokens_is_refused(shipped: dict) -> None:
    # Llama 2's tokenizer has no pre-tokenizer and this template ends the prompt with "[/INST]" as plain
    # text: the small test vocabulary merges "])" across the boundary, so the answer has no tokens of its own.
    pair = to_pair({"prompt": "Capital of France?", "chosen": ")", "rejected": "Lyon"}, "data.jsonl", 3)
    with pytest.raises(AthanorError, match="^data.jsonl:3: field 'chosen': the answer changes how the prompt "
                                           "tokenizes"):
        encode_pair(shipped["llama2"], pair)


def test_a_pair_longer_than_the_context_names_the_rule(tokenizer) -> None:
    pair = to_pair({"prompt": "Capital of France?", "chosen": "Paris " * 20, "rejected": "Lyon"}, "data.jsonl", 7)
    enc = encode_pair(tokenizer, pair)
    n_prompt, n_chosen = len(enc.prompt_ids), len(enc.chosen_ids)
    limit = n_prompt + n_chosen - 1
    with pytest.raises(AthanorError) as e:
        encode_pair(tokenizer, pair, max_length=limit)
    assert str(e.value) == (f"data.jsonl:7: field 'chosen': prompt ({n_prompt} tokens) + answer ({n_chosen} tokens) "
                            f"= {n_prompt + n_chosen} tokens is longer than the context (max_length={limit}); "
                            "shorten the pair, raise the context length, or truncate")
    cut = encode_pair(tokenizer, pair, max_length=limit, truncate=True)
    assert cut.chosen_ids == enc.chosen_ids[:-1] and cut.rejected_ids == enc.rejected_ids
    with pytest.raises(AthanorError, match=f"^data.jsonl:7: field 'chosen': no answer token left to learn from: "
                                           f"the prompt alone is {n_prompt} tokens of max_length={n_prompt}"):
        encode_pair(tokenizer, pair, max_length=n_prompt, truncate=True)


def test_cli_data_check_on_preference_files(tmp_path: Path, tokenizer_dir: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", list(FORMS.values()))
    r = athanor("data", "check", str(good), "--tokenizer", str(tokenizer_dir))
    assert r.returncode == 0, r.stderr
    assert "3 preference pairs {'standard': 1, 'conversational': 1, 'conversational_implicit': 1}, 0 errors" in r.stdout
    assert "chosen_tokens" in r.stdout and "rejected_tokens" in r.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [FORMS["standard"], {"prompt": "q", "chosen": "a", "rejected": "a"},
                                               {"prompt": "q", "chosen": "long answer " * 50, "rejected": "b"}])
    r = athanor("data", "check", str(bad), "--tokenizer", str(tokenizer_dir), "--max-length", "64")
    assert r.returncode == 2
    errors = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("error:")]
    assert errors[0] == f"error: {bad}:2: field 'rejected': chosen and rejected are the same answer: nothing to prefer"
    assert errors[1].startswith(f"error: {bad}:3: field 'chosen': prompt (") and "max_length=64" in errors[1]
    assert len(errors) == 2 and r.stderr.strip() == "athanor: error: some records are invalid (see above)"
    r = athanor("data", "check", str(good), "--max-length", "64")
    assert r.returncode == 2 and r.stderr.strip().endswith("--max-length counts tokens, so it needs --tokenizer")
