"""Config location, composition and the schema merge (common.config)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common import config
from common.errors import ConfigError, UserError


def test_compose_config_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs are found relative to the package, not the cwd
    cfg = config.compose_config("pretrain", ["name=abc", "optim.batch_size=64"])
    assert cfg.name == "abc" and cfg.run_dir == "outputs/pretrain/abc" and cfg.optim.batch_size == 64
    assert "seed" in cfg


def test_config_dir_override_for_installed_packages(tmp_path, monkeypatch):
    (tmp_path / "pretrain.yaml").write_text("name: elsewhere\nrun_dir: outputs/pretrain/${name}\nseed: 1\n")
    monkeypatch.setenv(config.CONFIG_DIR_ENV, str(tmp_path))
    assert config.config_dir() == tmp_path.resolve()
    assert config.compose_config("pretrain", []).name == "elsewhere"


def test_compose_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no config .*pretrian.yaml"):
        config.compose_config("pretrian", [])
    with pytest.raises(ConfigError, match="does not compose.*no_such_key"):
        config.compose_config("pretrain", ["no_such_key=1"])
    with pytest.raises(ConfigError, match="key=value"):
        config.compose_config("pretrain", ["optim.lr"])


@dataclass
class _Inner:
    lr: float = 0.1


@dataclass
class _Schema:
    name: str = "x"
    optim: _Inner = field(default_factory=_Inner)


def test_merge_onto_schema_names_the_bad_key_and_the_valid_ones():
    merged = config.merge_onto_schema({"optim": {"lr": 0.5}, "hydra": {"run": 1}}, _Schema, "toy")
    assert merged.optim.lr == 0.5 and merged.name == "x" and "hydra" not in merged
    with pytest.raises(ConfigError, match=r"bad toy config at 'optim.lrr'.*valid keys of optim: \['lr'\]"):
        config.merge_onto_schema({"optim": {"lrr": 0.5}}, _Schema, "toy")
    with pytest.raises(ConfigError, match=r"valid top-level keys: \['name', 'optim'\]"):
        config.merge_onto_schema({"nme": "y"}, _Schema, "toy")
    with pytest.raises(UserError):  # every CLI catches the base class
        config.merge_onto_schema({"optim": {"lr": "fast"}}, _Schema, "toy")
