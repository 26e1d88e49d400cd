"""Sampling and scoring with a client's model, checked against Hugging Face's own generate and the training path."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import fedpdpo.sampling as sampling_module
from fedpdpo.config import load_config
from fedpdpo.data import PairTokenizer, PreferenceRecord, collate, load_records
from fedpdpo.export import export_client, load_from_run
from fedpdpo.generate import generate, generate_ids, score
from fedpdpo.model.backbone import load_backbone
from fedpdpo.sampling import SamplingConfig, sample_token
from tests.conftest import TINY_CONFIG, TINY_DATA

PROMPT = "Write a short review of the movie."
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from fedpdpo.engines.inprocess import run_inprocess

    out = tmp_path_factory.mktemp("run")
    run_inprocess(load_config(TINY_CONFIG, ["rounds=1", "local_steps=3"]), out, quiet=True)
    return out


@pytest.fixture(scope="module")
def cm(run_dir):
    return load_from_run(run_dir, 0)


def _training_prompt(cm, prompt: str = PROMPT) -> list[int]:
    """The prompt's ids exactly as training built them for this client."""
    return list(
        PairTokenizer(cm.tokenizer, cm.max_length, cm.max_prompt_length)(
            0, PreferenceRecord(prompt, "a", "b")
        ).prompt_ids
    )


def _hf_greedy(causal_lm, cm, n: int) -> list[int]:
    prompt_ids = _training_prompt(cm)
    ids = torch.tensor([prompt_ids])
    out = causal_lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt_ids) :].tolist()


def test_sample_token_greedy_and_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05]))
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, 0.0, 0.9, gen) == 1
    assert {sample_token(logits, 1.0, 0.5, gen) for _ in range(50)} == {1}  # top token alone holds 0.6 >= 0.5
    drawn = {sample_token(logits, 1.0, 0.85, gen) for _ in range(200)}
    assert drawn == {1, 2}  # nucleus {0.6, 0.3}; the 0.05 tails are cut
    assert len({sample_token(logits, 1.0, 1.0, gen) for _ in range(400)}) == 4


def test_nucleus_beyond_the_candidates_falls_back_to_the_whole_vocabulary(monkeypatch):
    """With 2 candidates holding 0.6 of the mass, a 0.95 nucleus needs the third token: the same set as a full sort,
    and a nucleus inside the candidates never draws outside it."""
    monkeypatch.setattr(sampling_module, "NUCLEUS_CANDIDATES", 2)
    logits = torch.log(torch.tensor([0.02, 0.35, 0.25, 0.2, 0.18]))
    gen = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, 0.95, gen) for _ in range(400)} == {1, 2, 3, 4}
    assert {sample_token(logits, 1.0, 0.5, gen) for _ in range(200)} == {1, 2}


def test_sampling_is_seeded(cm):
    a = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=3)
    b = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=4)
    assert generate_ids(cm, PROMPT, sampling=a) == generate_ids(cm, PROMPT, sampling=a)
    assert generate_ids(cm, PROMPT, sampling=a) != generate_ids(cm, PROMPT, sampling=b)
    assert isinstance(generate(cm, PROMPT, sampling=a), str)


@pytest.mark.parametrize("variant", ["personalized", "base"])
def test_rows_of_one_call_are_the_single_samples_of_their_seeds(cm, variant):
    """The prompt runs once and the rows continue its key/values: row k of an n-row call is the one-row sample of
    seed ``seed + k`` (what best-of's layout and the judge's slots rely on), with a repetition penalty too."""
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=5, repetition_penalty=1.3)
    prompt_ids = _training_prompt(cm)
    rows = sampling_module.sample_responses(cm.model, prompt_ids, variant, 3, sampling, set())
    for k, row in enumerate(rows):
        one = dataclasses.replace(sampling, seed=sampling.seed + k)
        assert row == sampling_module.sample_responses(cm.model, prompt_ids, variant, 1, one, set())[0]
    assert len({tuple(r) for r in rows}) > 1


def test_base_variant_matches_transformers_generate(cm):
    ours = generate_ids(cm, PROMPT, "base", GREEDY)
    assert ours == _hf_greedy(load_backbone("tiny")[0], cm, GREEDY.max_new_tokens)[: len(ours)]


def test_global_variant_matches_peft_generate(cm, run_dir, tmp_path):
    from peft import PeftModel

    export_client(run_dir, 0, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(load_backbone("tiny")[0], tmp_path / "a")
    ours = generate_ids(cm, PROMPT, "global", GREEDY)
    assert ours == _hf_greedy(peft_model, cm, GREEDY.max_new_tokens)[: len(ours)]


@pytest.mark.parametrize("prompt", [PROMPT, "a prompt far longer than the prompt budget of the run " * 4])
def test_personalized_greedy_tokens_are_the_policy_argmax(cm, prompt):
    """The KV-cached loop picks, at every step, the argmax of a full forward pass through adapter and head, from
    the prompt exactly as training builds it (also when the prompt is cut to the client's budget)."""
    new = generate_ids(cm, prompt, "personalized", GREEDY)
    assert new
    prompt_ids = _training_prompt(cm, prompt)
    ids = torch.tensor([prompt_ids + new])
    with torch.no_grad():
        hidden = cm.model.local["adapter"](cm.model.decoder(input_ids=ids).last_hidden_state)
        logits = hidden[0] @ cm.model.local["head"].weight.T
    predicted = logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    assert predicted == new


def test_score_matches_the_training_forward_pass(cm):
    records, _ = load_records(TINY_DATA)
    rec = records[0]
    rows = score(cm, rec.prompt, [rec.chosen, rec.rejected])
    tok = PairTokenizer(cm.tokenizer, cm.max_length, cm.max_prompt_length)
    batch = collate([tok(0, rec)], tok.pad_id)
    with torch.no_grad():
        out = cm.model(batch)
        ref = cm.model.reference_logps(batch)
    for i, row in enumerate(rows):
        assert row.logp == pytest.approx(float(out.logps[i]), abs=1e-4)
        assert row.ref_logp == pytest.approx(float(ref[i]), abs=1e-4)
        assert row.explicit == pytest.approx(float(out.rewards[i]), abs=1e-5)
        assert row.implicit == pytest.approx(cm.beta * (row.logp - row.ref_logp))
    assert rows[0].implicit != rows[1].implicit


def test_generate_and_score_cli(run_dir, capsys):
    from fedpdpo.cli import main

    base = ["--run", str(run_dir), "--client", "1", "--json"]
    assert main(["generate", *base, "--prompt", PROMPT, "--with-global", "--with-base", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["model"] for x in lines] == ["personalized", "global", "base"]
    assert main(["score", *base, "--pairs", str(TINY_DATA), "--limit", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and lines[-1]["summary"]["pairs"] == 3
    assert 0.0 <= lines[-1]["summary"]["accuracy_explicit"] <= 1.0
    assert main(["score", *base, "--prompt", PROMPT]) == 2  # no --response: a one-line user error


def test_score_skips_bad_pairs_as_its_error_message_suggests(run_dir, tmp_path, capsys):
    from fedpdpo.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"prompt": "p", "chosen": \n' + TINY_DATA.read_bytes())
    base = ["score", "--run", str(run_dir), "--client", "0", "--json", "--pairs", str(pairs), "--limit", "2"]
    assert main(base) == 2
    assert "use --on-bad-record skip" in capsys.readouterr().err
    assert main([*base, "--on-bad-record", "skip"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["summary"]["pairs"] == 2


def test_generate_help_shows_the_sampling_defaults(capsys):
    """--help states the defaults, and they are SamplingConfig's (the CLI spells them without importing torch)."""
    import dataclasses

    from fedpdpo.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    args = parser.parse_args(["generate", "--prompt", "x"])
    for field in dataclasses.fields(SamplingConfig):
        default = getattr(SamplingConfig(), field.name)
        assert getattr(args, field.name) == default
        assert f"--{field.name.replace('_', '-')}" in shown
    for default in ("(default: 64)", "(default: 0.7)", "(default: 0.9)", "(default: 0)"):
        assert default in shown


def test_score_pairs_table_shows_line_numbers_and_the_rejected_text(run_dir, tmp_path, capsys, monkeypatch):
    from fedpdpo.cli import main

    monkeypatch.setenv("COLUMNS", "220")
    pairs = tmp_path / "pairs.jsonl"
    records = [json.loads(line) for line in TINY_DATA.read_text().splitlines()[:2]]
    pairs.write_text("\n" + "\n".join(json.dumps(r) for r in records) + "\n")  # a blank first line: lines 2, 3
    assert main(["score", "--run", str(run_dir), "--client", "0", "--pairs", str(pairs)]) == 0
    out = capsys.readouterr().out
    cells = [[c.strip() for c in line.replace("┃", "│").split("│")] for line in out.splitlines()]
    assert ["line", "prompt", "chosen", "rejected", "implicit margin", "explicit margin"] in cells
    rows = [r for r in cells if r[0].isdigit()]
    assert [r[0] for r in rows] == ["2", "3"]
    for record in records:
        assert record["rejected"][:20] in out


def test_repetition_penalty_is_transformers_rule(cm):
    """``repetition_penalty`` gives what transformers' ``generate(repetition_penalty=...)`` gives (greedy, base
    model), and it changes the tokens (so the comparison is not between two unpenalized runs)."""
    from dataclasses import replace

    penalized = replace(GREEDY, repetition_penalty=5.0)
    ours = generate_ids(cm, PROMPT, "base", penalized)
    prompt_ids = _training_prompt(cm)
    ids = torch.tensor([prompt_ids])
    hf = (
        load_backbone("tiny")[0]
        .generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=GREEDY.max_new_tokens,
            repetition_penalty=5.0,
        )[0, len(prompt_ids) :]
        .tolist()
    )
    assert ours == hf[: len(ours)] and ours
    assert ours != generate_ids(cm, PROMPT, "base", GREEDY)


def test_best_of_returns_the_sample_the_clients_own_score_ranks_first(cm):
    """generate_best_of: of n samples (seeds seed .. seed + n - 1), the one with the highest explicit reward under
    the client's model; best of 1 is the plain sample."""
    from fedpdpo.generate import generate_best_of, own_score

    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=3)
    texts = [generate(cm, PROMPT, "personalized", SamplingConfig(6, 1.0, 1.0, 3 + k)) for k in range(4)]
    values = [own_score(r) for r in score(cm, PROMPT, texts)]
    assert len(set(values)) > 1  # the candidates differ, so the choice is a real one
    assert generate_best_of(cm, PROMPT, 4, sampling) == texts[max(range(4), key=values.__getitem__)]
    assert generate_best_of(cm, PROMPT, 1, sampling) == texts[0]
    row = score(cm, PROMPT, texts[:1])[0]
    assert own_score(row) == row.explicit
    assert own_score(dataclasses.replace(row, explicit=None)) == row.implicit  # no reward head: the implicit reward


def test_own_scores_are_the_explicit_rewards_of_the_full_scoring_pass(cm):
    """own_scores runs only the reward head's path, and gives what score_responses' rows rank by (own_score), in
    batches of any size; without a reward head, the implicit reward."""
    from fedpdpo.data.tokenize import PairTokenizer
    from fedpdpo.generate import own_score, own_scores

    assert "reward_head" in cm.model.local
    texts = [generate(cm, PROMPT, "personalized", SamplingConfig(6, 1.0, 1.0, k)) for k in range(5)]
    full = [own_score(r) for r in score(cm, PROMPT, texts)]
    pair_tok = PairTokenizer(cm.tokenizer, cm.max_length, cm.max_prompt_length)
    for batch_size in (16, 2):
        got = own_scores(cm.model, pair_tok, cm.beta, PROMPT, texts, batch_size)
        assert got == pytest.approx(full, rel=1e-5, abs=1e-6)
    head = cm.model.local.pop("reward_head")  # without a reward head: the implicit reward, as own_score's rows
    try:
        implicit = [own_score(r) for r in score(cm, PROMPT, texts)]
        assert own_scores(cm.model, pair_tok, cm.beta, PROMPT, texts, 2) == pytest.approx(implicit, rel=1e-4, abs=1e-5)
    finally:
        cm.model.local["reward_head"] = head


def test_generate_cli_best_of(run_dir, capsys):
    from fedpdpo.cli import main

    base = ["generate", "--run", str(run_dir), "--client", "0", "--json", "--prompt", PROMPT, "--max-new-tokens", "4"]
    assert main([*base, "--best-of", "3"]) == 0
    assert [json.loads(x)["model"] for x in capsys.readouterr().out.splitlines()] == ["personalized"]
    assert main([*base, "--best-of", "0"]) == 2


def test_decoding_runs_grouped_attention_and_restores_it(cm):
    """Inside the block a Llama-type decoder runs :func:`grouped_attention` and gives what eager attention gives; the
    setting is restored on exit, even on error. Under the judge's autocast the frozen weights are already bf16
    copies (``frozen_weights_as``)."""
    decoder = cm.model.decoder
    attention = decoder.config._attn_implementation
    ids = torch.tensor([_training_prompt(cm)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), cm.model.frozen_weights_as(torch.bfloat16):
        with sampling_module.decoding(decoder):
            expected = decoder(input_ids=ids).last_hidden_state
        decoder.config._attn_implementation = "eager"
        try:
            plain = decoder(input_ids=ids).last_hidden_state
        finally:
            decoder.config._attn_implementation = attention
        with pytest.raises(RuntimeError), sampling_module.decoding(decoder):
            frozen = [
                m.weight for m in decoder.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
            ]
            assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
            assert decoder.config._attn_implementation == sampling_module.GROUPED
            raise RuntimeError
    torch.testing.assert_close(expected, plain, rtol=2e-2, atol=2e-2)  # bf16: one rounding step apart at most
    assert decoder.config._attn_implementation == attention


def test_grouped_attention_is_eager_attention_with_padding_and_cache(cm):
    """fp32, left-padded rows of different lengths, then one cached decoding step: grouped attention's hidden
    states are eager attention's (the tiny model has 4 query heads per key/value head)."""
    decoder = cm.model.decoder
    config = decoder.config
    assert config.num_attention_heads > config.num_key_value_heads
    ids = torch.tensor([[5, 5, 7, 9, 11], [3, 4, 6, 8, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    step = torch.tensor([[12], [13]])
    outputs = {}
    attention = config._attn_implementation
    for name in ("eager", sampling_module.GROUPED):
        config._attn_implementation = name
        try:
            with torch.no_grad():
                first = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
                second = decoder(
                    input_ids=step,
                    attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                    position_ids=positions[:, -1:] + 1,
                    cache=first.cache,
                    use_cache=True,
                )
        finally:
            config._attn_implementation = attention
        outputs[name] = (first.last_hidden_state[:, -1], second.last_hidden_state)
    for got, want in zip(outputs[sampling_module.GROUPED], outputs["eager"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["personalized", "base"])
def test_batch_of_prompts_of_different_lengths_gives_each_prompts_own_samples(cm, variant):
    """Rows of one :func:`sample_batch` call with prompts of different lengths (left-padded) are the samples each
    prompt gives alone with the row's seed, with a repetition penalty and whatever ``max_rows`` splits them."""
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, repetition_penalty=1.3)
    long = _training_prompt(cm)
    short = long[: len(long) // 2]
    prompts, seeds = [long, short, long, short, short], [3, 3, 4, 9, 11]
    for max_rows in (5, 2):
        rows = sampling_module.sample_batch(cm.model, prompts, seeds, variant, sampling, set(), max_rows=max_rows)
        for prompt, seed, row in zip(prompts, seeds, rows, strict=True):
            alone = dataclasses.replace(sampling, seed=seed)
            assert row == sampling_module.sample_responses(cm.model, prompt, variant, 1, alone, set())[0]
    with pytest.raises(ValueError, match="one seed per prompt row"):
        sampling_module.sample_batch(cm.model, prompts, seeds[:2], variant, sampling, set())


def test_realigned_logits_are_the_geometric_mixture():
    """softmax(realigned(policy, reference, L)) is proportional to p_policy^L * p_reference^(1 - L)."""
    policy, reference = torch.randn(50), torch.randn(50)
    p, r = torch.softmax(policy, -1), torch.softmax(reference, -1)
    for strength in (0.0, 0.5, 1.0, 2.0, 3.0):
        mixed = p**strength * r ** (1 - strength)
        got = torch.softmax(sampling_module.realigned(policy, reference, strength), -1)
        torch.testing.assert_close(got, mixed / mixed.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["personalized", "global"])
def test_realign_zero_samples_the_reference(cm, variant):
    """At strength 0 the policy's tokens are drawn from the reference alone: the base model's samples, seed for
    seed (the reference runs on its own key/value cache next to the policy's)."""
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=2)
    prompt_ids = _training_prompt(cm)
    base = sampling_module.sample_responses(cm.model, prompt_ids, "base", 3, sampling, set())
    zero = dataclasses.replace(sampling, realign=0.0)
    assert sampling_module.sample_responses(cm.model, prompt_ids, variant, 3, zero, set()) == base
    assert sampling_module.sample_responses(cm.model, prompt_ids, "base", 3, zero, set()) == base


def test_realigned_greedy_tokens_are_the_argmax_of_the_extrapolated_log_ratio(cm):
    """At strength L, each greedy token is the argmax of ``L log pi - (L - 1) log pi_ref`` computed by full forward
    passes of the personalized policy and of the reference on the sequence so far. L = 32: the tiny policy, three
    steps from the reference, has the reference's greedy tokens up to L = 16; at 32 its log-ratio decides."""
    strength = 32.0
    new = generate_ids(cm, PROMPT, "personalized", dataclasses.replace(GREEDY, realign=strength))
    assert new
    prompt_ids = _training_prompt(cm)
    ids = torch.tensor([prompt_ids + new])
    with torch.no_grad():
        hidden = cm.model.local["adapter"](cm.model.decoder(input_ids=ids).last_hidden_state)
        log_pi = torch.log_softmax(hidden[0] @ cm.model.local["head"].weight.T, -1)
        with cm.model.peft.disable_adapter():
            ref_hidden = cm.model.decoder(input_ids=ids).last_hidden_state
        log_ref = torch.log_softmax(ref_hidden[0] @ cm.model.ref_head_weight.T, -1)
    predicted = (strength * log_pi - (strength - 1) * log_ref)[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    assert predicted == new
    assert new != generate_ids(cm, PROMPT, "personalized", GREEDY)  # the extrapolation changed the tokens
