"""Typed configs: YAML + dotted overrides; every error names the key and its source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from xdtrain.config import MISSING, ConfigError, load_config, parse_overrides, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    name: Literal["adam", "sgd"] = "adam"


@dataclass
class Job:
    data: str = MISSING
    epochs: int = 2
    fanouts: list[int] = field(default_factory=lambda: [10, 10])
    seed: int | None = None
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, text: str):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "data: /x\noptim:\n  lr: 0.1\n")
    cfg = load_config(Job, p, ["optim.name=sgd", "epochs=5", "fanouts=[5,3]", "seed=7"])
    assert cfg.data == "/x" and cfg.epochs == 5 and cfg.fanouts == [5, 3] and cfg.seed == 7
    assert cfg.optim == Optim(lr=0.1, name="sgd")
    assert to_dict(cfg)["optim"]["lr"] == 0.1


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(Job, write(tmp_path, "data: d\noptim: {lr: 1}\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "data: d\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: unknown key 'optim\.lrr'"):
        load_config(Job, p)


def test_unknown_override_is_blamed_on_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"command-line override: unknown key 'optim\.beta'"):
        load_config(Job, write(tmp_path, "data: d\n"), ["optim.beta=3"])


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.yaml: key 'epochs' expects int, got 'two'"):
        load_config(Job, write(tmp_path, "data: d\nepochs: two\n"))
    with pytest.raises(ConfigError, match=r"key 'fanouts\[1\]' expects int"):
        load_config(Job, write(tmp_path, "data: d\nfanouts: [1, x]\n"))
    with pytest.raises(ConfigError, match=r"key 'optim.name' must be one of \['adam', 'sgd'\]"):
        load_config(Job, write(tmp_path, "data: d\n"), ["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match=r"key 'epochs' expects int, got True"):
        load_config(Job, write(tmp_path, "data: d\nepochs: true\n"))


def test_missing_required_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.yaml: missing required key 'data'"):
        load_config(Job, write(tmp_path, "epochs: 3\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Job, write(tmp_path, "data: [unclosed\n"))


def test_parse_overrides_rejects_missing_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["epochs"])
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
