"""Config loading, overrides and validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedpdpo.config import config_from_dict, load_config, parse_override
from fedpdpo.data import build_clients
from fedpdpo.errors import ConfigError
from tests.conftest import ROOT, TINY_CONFIG, TINY_DATA


def test_tiny_config_resolves_data_path_relative_to_file():
    cfg = load_config(TINY_CONFIG)
    assert cfg.model == "tiny" and cfg.data.path == str(TINY_DATA)


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY_CONFIG, ["rounds=5", "lora.r=2", "method.eval_score=implicit", "lr=1e-4"])
    assert (cfg.rounds, cfg.lora.r, cfg.method.eval_score, cfg.lr) == (5, 2, "implicit", 1e-4)
    assert parse_override("lora.target_modules=['q_proj']") == (["lora", "target_modules"], ["q_proj"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("roundz=3", "unknown config key 'roundz'"),
        ("lora.rank=3", "unknown config key 'lora.rank'"),
        ("rounds='three'", "config key 'rounds' must be int"),
        ("partition.method='random'", "config key 'partition.method' must be one of"),
        ("batch_size=0", "config key 'batch_size' must be > 0"),
        ("method.personal_head=1", "must be true or false"),
        ("partition.conflict_fraction=1.5", "partition.conflict_fraction"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CONFIG, [override])


def test_missing_data_path_and_missing_file(tmp_path):
    cfg = config_from_dict({})  # valid: in a deployment each node can hold its own file instead
    with pytest.raises(ConfigError, match=r"'data\.path' is empty.*each node can hold its own file"):
        build_clients(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.toml")), ids=lambda p: p.stem)
def test_shipped_configs_load_and_name_existing_data(path):
    """Every config in configs/ validates, and its data files exist (the experiments read ../shared/data)."""
    cfg = load_config(path)
    for data_file in map(Path, filter(None, [cfg.data.path, *cfg.data.extra_paths])):
        # a checkout without ../shared/data can still check the config itself; a wrong name in it cannot pass
        if data_file.parent.is_dir():
            assert data_file.is_file(), f"{path.name}: data file {data_file} is missing"
    assert cfg.rounds >= 1 and cfg.local_steps >= 1


# -- every value is range-checked, NaN and infinity never pass ----------------------------------------------------


def _numeric_keys() -> dict[str, type]:
    from fedpdpo.config import RunConfig, _flatten_values

    values = _flatten_values(RunConfig())
    return {k: type(v) for k, v in values if isinstance(v, int | float) and not isinstance(v, bool)}


def test_every_numeric_key_has_a_range():
    from fedpdpo.config import RANGES

    assert sorted(_numeric_keys()) == sorted(RANGES)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", [k for k, t in _numeric_keys().items() if t is float])
def test_non_finite_floats_are_rejected_for_every_key(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be a finite number"):
        load_config(TINY_CONFIG, [f"{key}={value}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_grad_norm=-1", "'max_grad_norm' must be > 0, got -1.0"),
        ("weight_decay=-0.1", "'weight_decay' must be >= 0"),
        ("seed=-1", "'seed' must be in [0, 4294967296)"),
        ("lora.dropout=1.0", "'lora.dropout' must be in [0, 1)"),
        ("method.local_lr_scale=0", "'method.local_lr_scale' must be > 0"),
        ("threads=-2", "'threads' must be >= 0"),
        ("perf.prefix_cache_mb=-1", "'perf.prefix_cache_mb' must be >= 0"),
        ('device="cuda:x"', "config key 'device' must be"),
        ('model=" "', "config key 'model' is empty"),
        ('lora.target_modules=[""]', "'lora.target_modules' must name at least one module"),
    ],
)
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY_CONFIG, [override])


def test_json_output_is_strict():
    from fedpdpo.jsonio import dumps

    assert json.loads(dumps({"a": float("nan"), "b": [float("inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}


# -- paths are saved absolute, with the text as given ---------------------------------------------------------------


def test_relative_paths_are_saved_absolute_with_the_original_text(tmp_path, monkeypatch):
    from fedpdpo.config import save_config

    monkeypatch.chdir(ROOT)
    cfg = load_config(TINY_CONFIG, ['data.test_path="data/tiny_pairs.jsonl"'])
    assert cfg.data.path == cfg.data.test_path == str(TINY_DATA)
    assert cfg.given_paths == {
        "data.path": f"'../data/tiny_pairs.jsonl' in {TINY_CONFIG}",
        "data.test_path": f"'data/tiny_pairs.jsonl' relative to the working directory {ROOT}",
    }
    save_config(cfg, tmp_path / "config.toml")
    text = (tmp_path / "config.toml").read_text()
    assert "#   data.test_path = 'data/tiny_pairs.jsonl' relative to the working directory" in text
    monkeypatch.chdir(tmp_path)  # what a resume from elsewhere reads
    again = load_config(tmp_path / "config.toml")
    assert again == cfg and again.given_paths == cfg.given_paths
    with pytest.raises(ConfigError, match="unknown config key 'given_paths'"):
        load_config(TINY_CONFIG, ["given_paths=1"])


# -- fedpdpo config show and --version ------------------------------------------------------------------------------


def test_config_show_prints_the_resolved_config_with_every_default(tmp_path, capsys):
    import tomllib

    from fedpdpo.cli import main
    from fedpdpo.config import RunConfig, config_to_dict

    assert main(["config", "show", "--config", str(TINY_CONFIG), "--set", "rounds=5"]) == 0
    text = capsys.readouterr().out
    want = load_config(TINY_CONFIG, ["rounds=5"])
    assert tomllib.loads(text) == config_to_dict(want)
    assert "prefix_cache_mb = 2048" in text and "[privacy]" in text  # keys the file leaves out, at their defaults
    assert "#   data.path = '../data/tiny_pairs.jsonl'" in text  # the path as given
    (tmp_path / "shown.toml").write_text(text)
    assert load_config(tmp_path / "shown.toml") == want  # what it prints is a config that runs the same
    assert main(["config", "show"]) == 0
    assert tomllib.loads(capsys.readouterr().out) == config_to_dict(RunConfig())


def test_version(capsys):
    import fedpdpo
    from fedpdpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedpdpo {fedpdpo.__version__}"
