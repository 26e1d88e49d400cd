"""Property-based tests: random and corrupted records never crash the loader with anything but a DataError that
names the file and line, skip mode keeps exactly the valid records, and valid records load unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpdpo.data.formats import hh_messages
from fedpdpo.data.records import check_file, load_records, validate_record
from fedpdpo.data.tokenize import PairTokenizer
from fedpdpo.errors import DataError
from fedpdpo.model.backbone import tiny_tokenizer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)
valid_records = st.fixed_dictionaries(
    {"prompt": text, "chosen": text, "rejected": text},
    optional={"domain": st.text(max_size=10), "split": st.sampled_from(["train", "test", ""]), "extra": json_values},
).filter(lambda r: r["chosen"].strip() != r["rejected"].strip())
# records that are almost right: a field missing, retyped, emptied, or the two responses made equal
field_names = st.sampled_from(["prompt", "chosen", "rejected", "domain", "split"])
broken_records = st.one_of(
    st.tuples(valid_records, field_names).map(lambda t: {k: v for k, v in t[0].items() if k != t[1]}),
    st.tuples(valid_records, field_names, json_values).map(lambda t: t[0] | {t[1]: t[2]}),
    st.tuples(valid_records, field_names, st.sampled_from(["", " ", "\n\t"])).map(lambda t: t[0] | {t[1]: t[2]}),
    valid_records.map(lambda r: r | {"rejected": r["chosen"]}),
    # a lone UTF-16 surrogate: valid JSON ("\\ud800"), but text no tokenizer can encode
    st.tuples(valid_records, field_names, st.characters(categories=["Cs"])).map(
        lambda t: t[0] | {t[1]: str(t[0].get(t[1], "x")) + t[2]}
    ),
    json_values,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One directory whose file every example rewrites (hypothesis reuses module-scoped fixtures)."""
    return tmp_path_factory.mktemp("hypothesis")


def _write(workdir: Path, lines: list[bytes]) -> Path:
    path = workdir / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


PAIR_TOKENIZER = PairTokenizer(tiny_tokenizer(), max_length=64, max_prompt_length=16)


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


@SETTINGS
@given(st.lists(valid_records, min_size=1, max_size=8))
def test_valid_records_load_unchanged(workdir, records):
    loaded, report = load_records(_write(workdir, [_line(r) for r in records]))
    assert report.n_skipped == 0 and report.n_read == len(records)
    # unchanged, except what data/formats.py documents: a text prompt in HH-RLHF form becomes its messages
    assert [(r.prompt, r.chosen, r.rejected) for r in loaded] == [
        (hh_messages(r["prompt"]) or r["prompt"], r["chosen"], r["rejected"]) for r in records
    ]
    assert [r.domain for r in loaded] == [r.get("domain") or "" for r in records]


@SETTINGS
@given(st.lists(valid_records | broken_records, min_size=1, max_size=10))
def test_skip_keeps_exactly_the_valid_records(workdir, objs):
    path = _write(workdir, [_line(o) for o in objs])
    valid = [o for o in objs if validate_record(o) is None]
    problems = check_file(path)
    assert len(problems) == len(objs) - len(valid)
    for problem in problems:  # FILE:LINE: problem
        where, _, line_problem = problem.partition(": ")
        assert where.startswith(f"{path}:") and where.rsplit(":", 1)[1].isdigit() and line_problem
    if not valid:
        with pytest.raises(DataError, match="no valid preference records"):
            load_records(path, "skip")
        return
    loaded, report = load_records(path, "skip")
    assert len(loaded) == len(valid) and report.n_skipped == len(problems)
    for i, record in enumerate(loaded):  # whatever the loader accepts, the tokenizer can encode
        assert PAIR_TOKENIZER(i, record).chosen_ids
    if problems:
        with pytest.raises(DataError) as err:
            load_records(path, "error")
        assert str(err.value).startswith(problems[0])  # the first problem, with its file:line


@SETTINGS
@given(st.lists(valid_records, min_size=2, max_size=6), st.data())
def test_corrupted_bytes_are_a_data_error_naming_the_line(workdir, records, data):
    lines = [_line(r) for r in records]
    victim = data.draw(st.integers(0, len(lines) - 1), label="line")
    raw = bytearray(lines[victim])
    how = data.draw(st.sampled_from(["truncate", "flip", "insert"]), label="corruption")
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    if how == "truncate":
        raw = raw[:pos]
    elif how == "flip":
        raw[pos] = data.draw(st.integers(0, 255).filter(lambda b: b not in (10, 13)), label="byte")
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4).filter(lambda b: b"\n" not in b and b"\r" not in b))
    lines[victim] = bytes(raw)
    path = _write(workdir, lines)
    try:
        loaded, _ = load_records(path, "error")
    except DataError as exc:
        assert str(exc).startswith(f"{path}:{victim + 1}: "), str(exc)
        assert check_file(path)[0].startswith(f"{path}:{victim + 1}: ")
    else:  # the corruption still left a valid record (or a blank line)
        assert len(loaded) in (len(records), len(records) - 1)
        assert check_file(path) == []


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(workdir, blob):
    path = _write(workdir, [blob])
    problems = check_file(path)
    assert all(p.startswith(f"{path}:") for p in problems)
    try:
        records, report = load_records(path, "skip")
    except DataError as exc:
        assert str(exc).startswith(f"{path}")
    else:
        assert records and report.n_read >= len(records)
