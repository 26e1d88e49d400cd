"""``fedpdpo evaluate``: the judge interface, the judge table and the cross-client accuracy matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpdpo.cli import main
from fedpdpo.config import load_config
from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.errors import ConfigError
from fedpdpo.evaluation import EvaluationSettings, difference_to_base, evaluate_run
from fedpdpo.judge import Judge, load_judge
from tests.conftest import TINY_CONFIG


def length_judge(prompts, responses):
    """A judge for the test: longer responses score higher."""
    return [float(len(r)) for r in responses]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated")
    run_inprocess(load_config(TINY_CONFIG, ["rounds=1", "local_steps=3"]), out, quiet=True)
    return out


def test_load_judge_specs(tmp_path):
    assert load_judge("sentiment")([""], ["What a wonderful film."])[0] > 0.5
    custom = load_judge("tests.test_evaluation:length_judge")
    assert isinstance(custom, Judge) and custom(["p", "p"], ["a", "abc"]) == [1.0, 3.0]
    with pytest.raises(ConfigError, match="cannot import"):
        load_judge("tests.test_evaluation:nope")
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_judge(str(tmp_path))
    with pytest.raises(ConfigError, match="use 'sentiment'"):
        load_judge("vibes")
    bad = Judge("bad", lambda p, r: [0.0])
    with pytest.raises(ConfigError, match="returned 1 scores for 2"):
        bad(["p", "p"], ["a", "b"])


def test_reward_model_directory_as_judge(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fedpdpo.model.backbone import tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = load_judge(str(tmp_path / "rm"))
    scores = judge(["q", "q", "q"], ["good", "bad", "good"])
    assert len(scores) == 3 and scores[0] == pytest.approx(scores[2]) and scores[0] != scores[1]


def test_matrix_diagonal_is_each_clients_own_accuracy_and_judge_reads_each_side(run_dir):
    settings = EvaluationSettings(judge="sentiment", samples=3, max_new_tokens=6)
    result = evaluate_run(run_dir, settings)
    summary = json.loads((run_dir / "summary.json").read_text())
    matrix = summary["cross_client"]
    own = [c["accuracy"] for c in summary["clients"]]
    assert [matrix["accuracy"][i][i] for i in range(len(own))] == pytest.approx(own, abs=1e-4)
    assert matrix["worst_client"] == pytest.approx(min(own), abs=1e-4)
    assert matrix["spread"] == pytest.approx(max(own) - min(own), abs=1e-4)
    rows = {r["client"]: r for r in summary["judge"]["clients"]}
    for c in summary["clients"]:  # tiny data: chosen "I loved it", rejected "I hated it"; conflict clients swap
        assert rows[c["id"]]["preferred_direction"] == (-1 if c["conflict"] else 1)
        assert rows[c["id"]]["samples"] == 3
        for model in ("personalized", "global", "base"):
            assert 0.0 <= rows[c["id"]][f"{model}/match"] <= 1.0
            assert 0.0 <= rows[c["id"]][f"{model}/win_rate_vs_base"] <= 1.0
            assert 0.0 <= rows[c["id"]][f"{model}/repeated_trigrams"] <= 1.0
        for model in ("personalized", "global"):
            oriented = rows[c["id"]][f"{model}/oriented_score"] - rows[c["id"]]["base/oriented_score"]
            assert rows[c["id"]][f"{model}/vs_base"] == pytest.approx(oriented, abs=2e-4)
            assert rows[c["id"]][f"{model}/vs_base_se"] >= 0.0
    assert json.loads((run_dir / "evaluation.json").read_text()) == result


def test_matrix_reads_each_clients_recorded_score_and_matches_choosing_again(run_dir):
    """The matrix ranks client i's cells by the score its run chose (summary.json) instead of evaluating its
    validation pairs again; choosing again gives the same matrix. A client whose recorded score is the global
    policy's gets its diagonal from the global policy (a cell used to look for a score it had not computed)."""
    from fedpdpo.evaluation import _recorded_scores, cross_client_matrix, load_run

    setup, global_, store = load_run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    recorded = _recorded_scores(summary)
    assert recorded == {c["id"]: c["selected_score"] for c in summary["clients"]} and recorded
    assert cross_client_matrix(setup, global_, store, recorded) == cross_client_matrix(setup, global_, store)
    matrix = cross_client_matrix(setup, global_, store, {0: "global"})
    assert matrix["accuracy"][0][0] == pytest.approx(summary["clients"][0]["accuracy_global"], abs=1e-4)
    assert _recorded_scores(None) == {}


def test_difference_to_base_and_its_paired_standard_error():
    """Sample i of both models answers the same prompt: the error is that of the per-sample differences, so a
    model that is the base plus a constant has no error at all, however much the prompts differ."""
    base = np.array([-0.9, 0.1, 0.8, -0.4])
    diff, se = difference_to_base(base + 0.3, base)
    assert diff == pytest.approx(0.3) and se == pytest.approx(0.0, abs=1e-12)
    diff, se = difference_to_base(np.array([1.0, 3.0]), np.array([0.0, 0.0]))
    assert diff == 2.0 and se == pytest.approx(np.sqrt(2.0 / 2))  # sample variance of the differences [1, 3] is 2
    assert difference_to_base(np.array([0.5]), np.array([0.5])) == (0.0, None)
    with pytest.raises(ValueError, match="paired"):
        difference_to_base(np.array([0.5]), np.array([0.0, 1.0]))


def test_cli_evaluate_with_a_custom_judge_and_report(run_dir, capsys):
    argv = ["evaluate", "--run", str(run_dir), "--judge", "tests.test_evaluation:length_judge"]
    assert main([*argv, "--samples", "2", "--max-new-tokens", "4"]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert set(brief) == {"cross_client", "judge"}
    assert json.loads((run_dir / "summary.json").read_text())["judge"]["judge"] == "tests.test_evaluation:length_judge"
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "What the models generate" in report and "Cross-client accuracy" in report
    assert "minus base: personalized / best_of / global" in report and " +- " in report
    assert "repeated trigrams %: personalized / best_of / global / base" in report
    assert main(["evaluate", "--run", str(run_dir), "--samples", "-1"]) == 2
    assert main([*argv, "--repetition-penalty", "0"]) == 2


def test_a_partial_evaluation_keeps_the_other_part(run_dir, capsys):
    """`--samples 0` (matrix only) after a judged evaluation, then `--no-matrix`: each call replaces the part it
    measured and keeps the other one, in evaluation.json and summary.json alike."""
    assert main(["evaluate", "--run", str(run_dir), "--samples", "2", "--max-new-tokens", "3"]) == 0
    judged = json.loads((run_dir / "evaluation.json").read_text())["judge"]
    assert main(["evaluate", "--run", str(run_dir), "--samples", "0"]) == 0
    assert set(json.loads(capsys.readouterr().out.splitlines()[-1])) == {"cross_client"}
    for name in ("evaluation.json", "summary.json"):
        kept = json.loads((run_dir / name).read_text())
        assert kept["judge"]["clients"] == judged["clients"] and "cross_client" in kept
    assert main(["evaluate", "--run", str(run_dir), "--no-matrix", "--samples", "1", "--max-new-tokens", "2"]) == 0
    both = json.loads((run_dir / "evaluation.json").read_text())
    assert both["judge"]["clients"][0]["samples"] == 1 and "cross_client" in both


def test_run_with_evaluate_writes_the_evaluation(tmp_path, capsys):
    """`fedpdpo run --evaluate` = `fedpdpo run` then `fedpdpo evaluate --run OUT` (its defaults), in one process."""
    out = tmp_path / "run"
    argv = ["run", "--config", str(TINY_CONFIG), "--out", str(out), "--quiet", "--evaluate", "--set", "rounds=1"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(printed["evaluation"]) == {"cross_client", "judge"}
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["judge"]["settings"]["samples"] == EvaluationSettings().samples
    assert json.loads((out / "summary.json").read_text())["cross_client"] == saved["cross_client"]


def test_repeated_trigrams_tells_a_loop_from_fluent_text():
    from fedpdpo.evaluation import repeated_trigrams

    assert repeated_trigrams("a gripping thriller with a great cast and a fine score") == 0.0
    assert repeated_trigrams("noir noir noir noir noir noir") == pytest.approx(3 / 4)  # 4 trigrams, 1 distinct
    assert repeated_trigrams("too short") == 0.0


def test_best_of_picks_per_slot_the_candidate_the_clients_own_score_ranks_first(monkeypatch):
    """Candidate j of slot k sits at j * count + k (the slot's personalized sample first)."""
    from fedpdpo import evaluation

    monkeypatch.setattr(evaluation, "own_reward", lambda setup, tok, prompt, texts: np.array([len(t) for t in texts]))
    candidates = ["a", "bb", "c", "dddd", "e", "ff"]  # count 2, best_of 3: slot 0 = a, c, e; slot 1 = bb, dddd, ff
    assert evaluation.best_of_texts(None, None, "p", candidates, 2, 3) == ["a", "dddd"]


def test_cli_evaluate_best_of_adds_a_judged_row(run_dir, capsys):
    argv = ["evaluate", "--run", str(run_dir), "--no-matrix", "--samples", "2", "--max-new-tokens", "4"]
    assert main([*argv, "--best-of", "3"]) == 0
    judge = json.loads((run_dir / "evaluation.json").read_text())["judge"]
    assert judge["models"] == ["personalized", "global", "base", "best_of"]
    for row in judge["clients"]:
        assert row["samples"] == 2 and 0.0 <= row["best_of/win_rate_vs_base"] <= 1.0
        assert row["best_of/vs_base"] == pytest.approx(
            row["best_of/oriented_score"] - row["base/oriented_score"], abs=2e-4
        )
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "oriented score: personalized / best_of / global / base" in report
    assert "personalized samples that the client's own reward head ranks first" in report  # the row is explained
    assert main([*argv, "--best-of", "0"]) == 2


def test_cli_evaluate_realign_adds_a_judged_row(run_dir, capsys):
    """`--realign L` (L != 1) judges personalized samples drawn at realignment strength L next to the plain ones,
    and the report says what the row is; by default (L = 1) there is no such row."""
    assert EvaluationSettings().realign == 1.0
    argv = ["evaluate", "--run", str(run_dir), "--no-matrix", "--samples", "2", "--max-new-tokens", "4"]
    assert main([*argv, "--best-of", "1", "--realign", "2"]) == 0
    judge = json.loads((run_dir / "summary.json").read_text())["judge"]
    assert judge["models"] == ["personalized", "global", "base", "realigned"]
    assert judge["settings"]["realign"] == 2.0
    for row in judge["clients"]:
        assert row["realigned/vs_base"] == pytest.approx(
            row["realigned/oriented_score"] - row["base/oriented_score"], abs=2e-4
        )
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "oriented score: personalized / realigned / global / base" in report
    assert "at realignment strength 2" in report
    assert main([*argv, "--realign", "-1"]) == 2
    assert main([*argv, "--realign", "inf"]) == 2


def test_sample_ablation_script_samples_each_client_with_a_module_put_back(run_dir, capsys, monkeypatch):
    """scripts/sample_ablation.py (the probe behind docs/results.md's "Where the loops come from"): one line per
    client and model, and the modules it swaps are restored afterwards (the run's own model is unchanged)."""
    import importlib.util
    import sys

    import torch

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("sample_ablation", ROOT / "scripts" / "sample_ablation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    head = torch.randn(3, 4)
    before = head.clone()
    with script.replaced([(head, torch.zeros(3, 4))]):
        assert not head.any()
    assert torch.equal(head, before)
    monkeypatch.setattr(sys, "argv", ["sample_ablation", "--run", str(run_dir), "--samples", "2"])
    script.main()
    lines = capsys.readouterr().out.splitlines()
    clients = len(json.loads((run_dir / "summary.json").read_text())["clients"])
    models = {line.split(" | ")[1] for line in lines}
    assert models == {
        "personalized",
        "personal head -> original",
        "adapter -> identity",
        "global",
        "base",
        "realigned, strength 2",
    }
    assert len(lines) == 6 * clients and all("repeated trigrams" in line for line in lines)


def test_cli_defaults_are_the_settings_defaults():
    """`fedpdpo evaluate` and `fedpdpo run --evaluate` judge alike: the command's defaults are EvaluationSettings'."""
    from fedpdpo.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--run", "x"])
    defaults = EvaluationSettings()
    names = ("judge", "samples", "max_new_tokens", "temperature", "top_p", "seed", "repetition_penalty", "best_of")
    for name in (*names, "realign"):
        assert getattr(args, name) == getattr(defaults, name), name
