"""``fedpdpo data inspect``: counts, token lengths, duplicates, problems and the partition preview."""

from __future__ import annotations

import json

import pytest

from fedpdpo.config import load_config
from fedpdpo.data import build_clients, check_file
from fedpdpo.data.inspect import inspect_data, length_stats
from fedpdpo.data.task import build_task
from fedpdpo.model.backbone import tiny_tokenizer
from tests.conftest import TINY_CONFIG, TINY_DATA


@pytest.fixture
def messy_file(tmp_path):
    good = [
        {"prompt": "Q1", "chosen": "yes", "rejected": "no", "domain": "a"},
        {"prompt": "Q1", "chosen": "maybe", "rejected": "never", "domain": "a"},
        {"prompt": "Q2", "chosen": "héllo", "rejected": "bye", "domain": "b", "split": "test"},
        {"prompt": "Q1", "chosen": "yes", "rejected": "no", "domain": "a"},  # exact duplicate of the first
    ]
    lines = [json.dumps(r) for r in good]
    lines.insert(1, '{"prompt": "Q3", "chosen": "x"}')  # missing 'rejected'
    lines.append("{not json")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_counts_problems_duplicates_domains(messy_file):
    report = inspect_data(messy_file, tiny_tokenizer())
    assert (report["records_read"], report["valid"], report["invalid"]) == (6, 4, 2)
    assert report["problems"] == check_file(messy_file)  # the same validation as training
    assert len(report["problems"]) == 2 and ":2: missing field 'rejected'" in report["problems"][0]
    assert report["domains"] == {"a": 3, "b": 1}
    assert report["splits"] == {"(none)": 3, "test": 1}
    dup = report["duplicates"]
    assert dup["duplicate_pairs"] == 1 and len(dup["duplicate_pair_examples"]) == 2
    assert (dup["unique_prompts"], dup["prompts_with_several_pairs"], dup["max_pairs_per_prompt"]) == (2, 1, 3)
    assert "partition" not in report


def test_token_lengths_count_bytes_plus_end_token(messy_file):
    """The tiny tokenizer is byte-level without merges: a response is its UTF-8 bytes plus the end token."""
    tokens = inspect_data(messy_file, tiny_tokenizer())["tokens"]
    # chosen: "yes", "maybe", "héllo" (6 bytes), "yes"
    assert (tokens["chosen"]["min"], tokens["chosen"]["max"]) == (4, 7)
    assert tokens["chosen"]["median"] == 5.0
    for stats in tokens.values():
        assert sum(stats["histogram"]["counts"]) == 4


def test_length_histogram_edges_cover_the_range():
    stats = length_stats([3, 7, 7, 40, 120])
    edges, counts = stats["histogram"]["edges"], stats["histogram"]["counts"]
    assert edges[0] == 3 and edges[-2] <= 120 < edges[-1]
    assert len(counts) == len(edges) - 1 <= 10 and sum(counts) == 5
    assert counts[0] == 3  # 3, 7, 7 share the first bin of width 12
    assert length_stats([5, 5])["histogram"] == {"edges": [5, 6], "counts": [2]}


def test_partition_preview_is_what_training_builds():
    cfg = load_config(TINY_CONFIG, ["num_clients=4", 'partition.method="dirichlet"', "partition.alpha=0.3"])
    report = inspect_data(TINY_DATA, tiny_tokenizer(), cfg)
    clients, _ = build_clients(cfg)
    preview = report["partition"]["clients"]
    tasks = [build_task(c, tiny_tokenizer(), cfg) for c in clients]
    assert [(c["n_train"], c["n_val"], c["n_test"], c["conflict"]) for c in preview] == [
        (len(t.train), len(t.val), len(t.test), c.conflict) for t, c in zip(tasks, clients, strict=True)
    ]
    assert sum(c["conflict"] for c in preview) == 2  # conflict_fraction 0.5 of 4 clients
    for c in preview:
        assert 0.99 <= sum(share for _, share in c["domain_mix"]) <= 1.0 + 1e-9  # two domains, top 3 shown
        assert c["max_length"] == 64 and 0.0 <= c["responses_truncated"] <= 1.0


def test_inspect_cli_json_and_table(messy_file, tmp_path, capsys):
    from fedpdpo.cli import main

    assert main(["data", "inspect", str(TINY_DATA), "--partition", str(TINY_CONFIG), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] == 80 and report["tokenizer"] == "tiny" and len(report["partition"]["clients"]) == 2

    out = tmp_path / "report.json"
    assert main(["data", "inspect", str(messy_file), "--model", "tiny", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "missing field 'rejected'" in printed and "duplicate pairs" in printed
    assert json.loads(out.read_text())["invalid"] == 2

    assert main(["data", "inspect", str(tmp_path / "absent.jsonl"), "--model", "tiny"]) == 2
    assert main(["data", "inspect", str(TINY_DATA), "--model", "tiny", "--set", "num_clients=3"]) == 2


def test_user_text_is_not_taken_as_rich_markup(tmp_path):
    from rich.console import Console

    from fedpdpo.data.inspect import render_report

    path = tmp_path / "[odd] name.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "domain": "[bold]law[/]"}, {"prompt": "p"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    console = Console(width=200, record=True)
    console.print(render_report(inspect_data(path, tiny_tokenizer())))
    text = console.export_text()
    assert "[bold]law[/]" in text and "[odd] name.jsonl:2: missing field 'chosen'" in text
