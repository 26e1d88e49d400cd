"""Config loading, overrides and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpdpo.config import config_from_dict, load_config, parse_override
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
    with pytest.raises(ConfigError, match=r"data\.path"):
        config_from_dict({})
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
