"""TRL's preference formats (explicit prompt, conversational, implicit prompt), column mapping and test splits."""

from __future__ import annotations

import json

import pytest

from fedpdpo.cli import main
from fedpdpo.config import load_config
from fedpdpo.data import build_clients, load_records
from fedpdpo.data.formats import FormatError, hh_messages, normalize
from fedpdpo.errors import DataError
from tests.conftest import TINY_CONFIG, TINY_DATA

HH_CHOSEN = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: Then?\n\nAssistant: Knead it."
HH_REJECTED = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: Then?\n\nAssistant: Buy it."


def _messages(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def test_conversational_format():
    row = normalize(
        {
            "prompt": _messages(("system", "Be kind."), ("user", "Hi?")),
            "chosen": _messages(("assistant", "Hello!")),
            "rejected": _messages(("assistant", "Go away.")),
        }
    )
    assert row["prompt"] == (("system", "Be kind."), ("user", "Hi?"))
    assert (row["chosen"], row["rejected"]) == ("Hello!", "Go away.")


def test_implicit_prompt_from_hh_transcripts_splits_at_the_last_common_assistant_turn():
    row = normalize({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert row["prompt"] == (("user", "How do I bake bread?"), ("assistant", "Mix flour and water."), ("user", "Then?"))
    assert (row["chosen"], row["rejected"]) == ("Knead it.", "Buy it.")
    assert hh_messages("Human: hi\n\nAssistant:") == (("user", "hi"),)  # the open turn is the generation prompt
    assert hh_messages("no markers here") is None
    # markers alone are no conversation: the text stays plain (found by tests/test_records_hypothesis.py)
    assert hh_messages("Human:") is None
    assert hh_messages(" Human:\n\nAssistant: ") is None
    assert normalize({"prompt": "Human:", "chosen": "a", "rejected": "b"})["prompt"] == "Human:"


def test_implicit_prompt_from_conversations():
    common = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]
    row = normalize(
        {"chosen": _messages(*common, ("assistant", "good")), "rejected": _messages(*common, ("assistant", "bad"))}
    )
    assert row["prompt"] == tuple(common) and (row["chosen"], row["rejected"]) == ("good", "bad")


def test_field_mapping_and_extras():
    row = normalize(
        {"question": "q", "good": "a", "bad": "b", "id": 7}, {"prompt": "question", "chosen": "good", "rejected": "bad"}
    )
    assert (row["prompt"], row["chosen"], row["rejected"], row["id"]) == ("q", "a", "b", 7)
    with pytest.raises(FormatError, match=r"missing field 'good' \(mapped to 'chosen' by data\.fields\)"):
        normalize({"question": "q", "bad": "b"}, {"chosen": "good"})


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"chosen": "abc", "rejected": "xyz"}, "share no beginning"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"field 'prompt'\[0\] must be a message"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "empty message list"),
        ({"prompt": "p", "chosen": _messages(("user", "x")), "rejected": "b"}, "assistant messages only"),
        ({"chosen": _messages(("user", "x")), "rejected": "x y"}, "both be text or both be message lists"),
        ({"chosen": _messages(("assistant", "a")), "rejected": _messages(("assistant", "b"))}, "share no turns"),
    ],
)
def test_what_does_not_fit_is_named(row, message):
    with pytest.raises(FormatError, match=message):
        normalize(row)


def test_conversational_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: field 'prompt'\[0\]"):
        load_records(path)


def test_datasetdict_test_split_and_fields(tmp_path):
    import datasets

    rows = [{"q": f"q{i}", "c": "good", "r": f"bad {i}"} for i in range(6)]
    datasets.DatasetDict(
        {"train_prefs": datasets.Dataset.from_list(rows[:4]), "test_prefs": datasets.Dataset.from_list(rows[4:])}
    ).save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(
        TINY_CONFIG,
        [
            f'data.path="{tmp_path / "dd"}"',
            'data.test_split="test_prefs"',
            'data.fields={prompt = "q", chosen = "c", rejected = "r"}',
            "num_clients=1",
        ],
    )
    (client,), _ = build_clients(cfg)
    assert sorted(r.prompt for r in client.test) == ["q4", "q5"] and len(client.train) == 4


def _conversational_file(tmp_path):
    rows = []
    for line in TINY_DATA.read_text().splitlines():
        rec = json.loads(line)
        rows.append(
            {
                "prompt": _messages(("system", "You review films."), ("user", rec["prompt"])),
                "chosen": _messages(("assistant", rec["chosen"])),
                "rejected": _messages(("assistant", rec["rejected"])),
            }
        )
    path = tmp_path / "conversational.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_conversational_run_end_to_end(tmp_path, capsys):
    path = _conversational_file(tmp_path)
    assert main(["data", "validate", str(path)]) == 0
    out = tmp_path / "run"
    argv = ["run", "--quiet", "--config", str(TINY_CONFIG), "--out", str(out), "--set", f'data.path="{path}"']
    assert main([*argv, "--set", "rounds=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_accuracy"] is not None and len(summary["clients"]) == 2
