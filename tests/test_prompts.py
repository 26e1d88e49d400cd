"""Prompt construction: the chat template is never cut, long prompts lose the start of their content only,
responses lose their end, automatic length limits, and generation builds prompts exactly as training does."""

from __future__ import annotations

import copy

import pytest

from fedpdpo.config import load_config
from fedpdpo.data import ClientData, PreferenceRecord
from fedpdpo.data.lengths import MAX_AUTO_LENGTH, resolve_lengths
from fedpdpo.data.prompts import PromptEncoder
from fedpdpo.data.task import build_task, split_validation
from fedpdpo.data.tokenize import PairTokenizer
from fedpdpo.errors import ConfigError
from fedpdpo.model.backbone import tiny_tokenizer
from tests.conftest import TINY_CONFIG

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<sys>You are helpful.</sys>\n' }}{% endif %}"
    "{{ '<' + message['role'] + '>' + message['content'] + '</turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHATML
    return tok


def _decode(tok, ids) -> str:
    return tok.decode(list(ids))


def test_template_spans_and_left_truncation_of_content_only(chat_tokenizer):
    enc = PromptEncoder(chat_tokenizer)
    prompt = "first words then the important end"
    spans = enc.encode(prompt)
    assert _decode(chat_tokenizer, spans.head) == "<sys>You are helpful.</sys>\n<user>"
    assert _decode(chat_tokenizer, spans.content) == prompt
    assert _decode(chat_tokenizer, spans.tail) == "</turn>\n<assistant>"
    full, cut = spans.ids()
    assert not cut
    rendered = chat_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert _decode(chat_tokenizer, full) == chat_tokenizer.decode(rendered)
    budget = len(spans.head) + len(spans.tail) + 13
    kept, cut = spans.ids(budget)
    assert cut and len(kept) == budget
    text = _decode(chat_tokenizer, kept)
    assert text.startswith("<sys>You are helpful.</sys>\n<user>") and text.endswith("</turn>\n<assistant>")
    assert "important end" in text and "first" not in text
    with pytest.raises(ConfigError, match="does not fit the chat template"):
        spans.ids(len(spans.head) + len(spans.tail))


def test_conversation_keeps_system_turn_and_cuts_earliest_turns(chat_tokenizer):
    enc = PromptEncoder(chat_tokenizer)
    convo = (("system", "Be brief."), ("user", "an old question"), ("assistant", "an old answer"), ("user", "now?"))
    spans = enc.encode(convo)
    assert _decode(chat_tokenizer, spans.head) == "<system>Be brief.</turn>\n<user>"
    assert _decode(chat_tokenizer, spans.tail) == "</turn>\n<assistant>"
    kept, cut = spans.ids(len(spans.head) + len(spans.tail) + 6)
    text = _decode(chat_tokenizer, kept)
    assert cut and text.startswith("<system>Be brief.</turn>\n<user>") and text.endswith("now?</turn>\n<assistant>")
    assert "old question" not in text


def test_responses_are_cut_from_their_end_and_closed_by_the_end_token(chat_tokenizer):
    tok = PairTokenizer(chat_tokenizer, max_length=200, max_prompt_length=80)
    record = PreferenceRecord("q", "short", "a much longer rejected answer " * 8)
    pair = tok(0, record)
    assert pair.chosen_ids[-1] == tok.end_id and len(pair.prompt_ids) + len(pair.rejected_ids) == 200
    assert _decode(chat_tokenizer, pair.rejected_ids).startswith("a much longer")
    assert pair.response_truncated and not pair.prompt_truncated


def test_long_prompt_is_truncated_not_an_error_and_shares_are_reported(chat_tokenizer):
    cfg = load_config(TINY_CONFIG, ["max_length=160", "data.max_prompt_length=80", "data.validation_fraction=0"])
    long = PreferenceRecord("word " * 80, "yes", "no", source="f.jsonl:1")
    short = PreferenceRecord("hi", "yes", "no", source="f.jsonl:2")
    task = build_task(ClientData(0, [long, short], [short]), chat_tokenizer, cfg)
    assert len(task.train[0].prompt_ids) == 80 and task.train[0].prompt_truncated
    assert task.info["prompts_truncated"] == 0.5 and task.info["responses_truncated"] == 0.0


def test_automatic_lengths_follow_the_clients_own_pairs(chat_tokenizer):
    tok = PairTokenizer(chat_tokenizer, 0, 0)
    records = [PreferenceRecord("p" * (5 + i), "r" * (10 + 2 * i), "s" * 3) for i in range(20)]
    encoded = [tok.encode(r) for r in records]
    lengths = resolve_lengths(encoded, 0, 0)
    prompt_lengths = sorted(len(p.prompt) for p in encoded)
    assert prompt_lengths[16] <= lengths.max_prompt_length <= prompt_lengths[18]  # the 90th percentile
    assert lengths.max_length - lengths.max_prompt_length >= sorted(len(p.chosen) for p in encoded)[17]
    long_prompts = [tok.encode(PreferenceRecord("p" * (100 + 10 * i), "r", "s")) for i in range(20)]
    assert resolve_lengths(long_prompts, 200, 0).max_prompt_length == 100  # at most half of a set max_length
    assert resolve_lengths(encoded, 0, 30) == resolve_lengths(encoded, 0, 30)
    huge = [tok.encode(PreferenceRecord("p" * 2000, "r" * 2000, "s"))]
    assert resolve_lengths(huge, 0, 0).max_length == MAX_AUTO_LENGTH


def test_validation_split_is_seeded_and_disjoint():
    records = [PreferenceRecord(f"p{i}", "a", "b") for i in range(20)]
    train, val = split_validation(records, 0.2, seed=3, client_id=1)
    assert len(val) == 4 and len(train) == 16 and not set(map(id, train)) & set(map(id, val))
    assert split_validation(records, 0.2, seed=3, client_id=1) == (train, val)
    assert split_validation(records, 0.2, seed=3, client_id=2) != (train, val)
    assert split_validation(records[:3], 0.2, 0, 0) == (records[:3], [])  # too few pairs for a validation set


@pytest.mark.smoke
def test_smollm2_template_is_kept_and_generation_uses_the_training_prompt(tmp_path):
    from fedpdpo.model.backbone import load_backbone

    tokenizer = load_backbone("smollm2")[1]
    tok = PairTokenizer(tokenizer, max_length=64, max_prompt_length=40)
    ids = tok.prompt_ids("Write a short review of the movie.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens([tok.end_id]) == ["<|im_end|>"]
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short review of the movie."}], add_generation_prompt=True
    )
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert ids == list(full)  # same ids as transformers' own rendering
