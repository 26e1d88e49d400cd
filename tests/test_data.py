"""Data loading, validation, partitioning and tokenization."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from fedpdpo.config import PartitionConfig
from fedpdpo.data import build_clients, check_file, load_records
from fedpdpo.data.holdout import pair_groups
from fedpdpo.data.partition import partition, split_train_test
from fedpdpo.data.records import PreferenceRecord
from fedpdpo.data.task import split_validation
from fedpdpo.data.tokenize import PairTokenizer, collate
from fedpdpo.errors import DataError
from fedpdpo.model.backbone import tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"prompt": "p", "chosen": "good answer", "rejected": "bad answer", "domain": "d", "source_row": 3}


def test_load_keeps_extras_and_fields(tmp_path):
    records, report = load_records(write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "split": "test"}]))
    assert len(records) == 2 and report.n_read == 2
    assert records[0].extras == {"source_row": 3}
    assert records[1].split == "test" and records[0].domain == "d"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"prompt": "p", "chosen": "a"', "malformed JSON"),
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(DataError, match=message) as err:
        load_records(path)
    assert f"{path}:2:" in str(err.value)
    assert check_file(path)[0].startswith(f"{path}:2: ")


def test_non_utf8_and_skip_mode(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n' + json.dumps(GOOD).encode())
    with pytest.raises(DataError, match=r"bytes.jsonl:2: not valid UTF-8"):
        load_records(path)
    records, report = load_records(path, on_bad_record="skip")
    assert len(records) == 2 and report.n_skipped == 1 and "UTF-8" in report.problems[0]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "chosen": ""}]), path)
    with pytest.raises(DataError, match=r"row 2: field 'chosen' is empty"):
        load_records(path)


def test_hf_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, {**GOOD, "chosen": "other"}]).save_to_disk(str(tmp_path / "ds"))
    records, _ = load_records(tmp_path / "ds")
    assert [r.chosen for r in records] == ["good answer", "other"]


def records(n: int, domains=("a", "b", "c")) -> list[PreferenceRecord]:
    return [PreferenceRecord(f"p{i}", f"c{i}", f"r{i}", domain=domains[i % len(domains)]) for i in range(n)]


def test_iid_partition_is_deterministic_and_disjoint():
    cfg = PartitionConfig(method="iid")
    a = partition(records(60), records(30), 3, cfg, seed=1)
    b = partition(records(60), records(30), 3, cfg, seed=1)
    assert [c.train for c in a] == [c.train for c in b]
    seen = [r.prompt for c in a for r in c.train]
    assert len(seen) == len(set(seen)) == 60
    assert [len(c.train) for c in a] == [20, 20, 20]
    assert partition(records(60), records(30), 3, cfg, seed=2)[0].train != a[0].train


def test_dirichlet_skews_labels_and_keeps_all_records():
    cfg = PartitionConfig(method="dirichlet", alpha=0.1)
    clients = partition(records(300), records(90), 3, cfg, seed=0)
    assert sum(len(c.train) for c in clients) == 300
    # with alpha = 0.1 each client is dominated by one label
    for c in clients:
        top = Counter(r.domain for r in c.train).most_common(1)[0][1]
        assert top / len(c.train) > 0.5


def test_by_domain_groups_and_patterns():
    recs = records(40, domains=("imdb", "Law", "Health", "Sociology"))
    cfg = PartitionConfig(method="by_domain", domains=[["imdb"], ["Law", "H*"], ["Sociology"]])
    clients = partition(recs, recs, 3, cfg, seed=0)
    assert [c.domains for c in clients] == [["imdb"], ["Health", "Law"], ["Sociology"]]
    assert {r.domain for r in clients[1].train} == {"Law", "Health"}
    with pytest.raises(DataError, match="matches no domain"):
        partition(recs, recs, 3, PartitionConfig(method="by_domain", domains=[["x"], ["Law"], ["imdb"]]), seed=0)


def test_conflict_clients_see_swapped_pairs_in_train_and_test():
    cfg = PartitionConfig(method="iid", conflict_fraction=1 / 3)
    clients = partition(records(30), records(30), 3, cfg, seed=0)
    conflicted = [c for c in clients if c.conflict]
    assert len(conflicted) == 1
    c = conflicted[0]
    assert all(r.chosen.startswith("r") and r.rejected.startswith("c") for r in c.train + c.test)


def test_empty_client_is_a_clear_error():
    with pytest.raises(DataError, match="client 3 got no training pairs"):
        partition(records(3), records(4), 4, PartitionConfig(method="iid"), seed=0)


def test_split_field_is_used_for_test_pool():
    recs = [PreferenceRecord("p", "c", "r", split="test" if i % 4 == 0 else "train") for i in range(20)]
    _, test = split_train_test(recs, 0.5, seed=0)
    assert len(test) == 5 and all(r.split == "test" for r in test)


def _questions(n_questions: int, wrong_per_question: int) -> list[PreferenceRecord]:
    """TruthfulQA's shape: each question's one best answer paired with each of its incorrect answers."""
    return [
        PreferenceRecord(f"q{q}?", f"best {q}", f"wrong {q}.{w}")
        for q in range(n_questions)
        for w in range(wrong_per_question)
    ]


def _sequences(recs: list[PreferenceRecord]) -> set[tuple[str, str]]:
    return {(r.prompt, y) for r in recs for y in (r.chosen, r.rejected)}


def test_pairs_sharing_a_sequence_form_one_group_and_a_shared_response_under_another_prompt_does_not():
    recs = [
        PreferenceRecord("a", "yes", "no"),
        PreferenceRecord("b", "sorry", "x"),
        PreferenceRecord("a", "yes", "maybe"),  # shares ("a", "yes") with the first
        PreferenceRecord("c", "sorry", "y"),  # the same response as the second, another prompt
        PreferenceRecord("a", "maybe", "never"),  # shares ("a", "maybe") with the third: joins the first group
    ]
    assert pair_groups(recs) == [0, 1, 0, 2, 0]


def test_random_test_and_validation_splits_keep_every_sequence_on_one_side():
    recs = _questions(60, 4)
    for seed in range(5):
        train, test = split_train_test(recs, 0.2, seed=seed)
        assert not _sequences(train) & _sequences(test)
        assert 48 <= len(test) <= 51 and len(train) + len(test) == len(recs)
        fit, val = split_validation(train, 0.2, seed=seed, client_id=1)
        assert not _sequences(fit) & _sequences(val)
        assert len(train) // 5 <= len(val) <= len(train) // 5 + 3


def test_pairs_without_shared_sequences_split_as_the_plain_seeded_permutation():
    """Data without shared sequences (IMDB: one pair per review) splits exactly as before groups existed."""
    recs = [PreferenceRecord("p", f"c{i}", f"r{i}") for i in range(30)]
    order = np.random.default_rng(7).permutation(30)[:6].tolist()
    train, test = split_train_test(recs, 0.2, seed=7)
    assert test == [recs[i] for i in sorted(order)] and len(train) == 24


def test_a_single_group_leaves_no_validation_rather_than_no_training_pairs():
    recs = [PreferenceRecord("q", "best", f"wrong {w}") for w in range(10)]
    assert split_validation(recs, 0.2, seed=0, client_id=0) == (recs, [])


def test_build_clients_on_tiny_fixture(tiny_cfg):
    clients, reports = build_clients(tiny_cfg)
    assert len(clients) == 2 and reports[0].n_skipped == 0
    assert sum(c.conflict for c in clients) == 1


def test_tokenize_truncates_and_collates():
    tok = tiny_tokenizer()
    pt = PairTokenizer(tok, max_length=24, max_prompt_length=8)
    pair = pt(0, PreferenceRecord("a long prompt that is cut", "chosen text " * 10, "no"))
    assert len(pair.prompt_ids) == 8
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 24  # chosen truncated to the budget
    assert pair.rejected_ids[-1] == tok.eos_token_id  # untruncated response keeps its end token
    batch = collate([pair, pt(1, PreferenceRecord("p", "x", "yy"))], pad_id=0)
    assert batch.input_ids.shape[0] == 4
    # rows: chosen0, chosen1, rejected0, rejected1; response mask covers exactly the response tokens
    assert batch.response_mask[0].sum().item() == len(pair.chosen_ids)
    assert batch.response_mask[2].sum().item() == len(pair.rejected_ids)
    assert not batch.response_mask[0, :8].any()
