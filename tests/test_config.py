from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from svlib.config import ConfigError, check_relative, flatten, from_dict, load_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Stage:
    name: str
    steps: int = 10
    amp: Literal["off", "bf16", "fp16"] = "off"
    layers: Optional[list[int]] = None
    optim: Optim = field(default_factory=Optim)


def test_nested_values_and_defaults():
    cfg = from_dict(Stage, {"name": "s1", "optim": {"lr": "2e-4"}, "layers": [1, 2]})
    assert cfg.optim.lr == pytest.approx(2e-4)  # YAML reads 2e-4 as a string: accepted as float
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.layers == [1, 2] and cfg.steps == 10


@pytest.mark.parametrize("data, message", [
    ({"name": "s1", "stepz": 3}, "unknown key(s) ['stepz']"),
    ({"name": "s1", "optim": {"lr": "fast"}}, "optim.lr: expected a number"),
    ({"name": "s1", "steps": 2.5}, "steps: expected an integer"),
    ({"name": "s1", "amp": "fp8"}, "amp: expected one of"),
    ({"steps": 3}, "name: required key is missing"),
    ({"name": "s1", "optim": {"betas": [0.9]}}, "optim.betas: expected 2 items"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Stage, data)
    assert message in str(err.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "s1.yaml"
    path.write_text("name: s1\nbogus: 1\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path, Stage)
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, Stage)


def test_round_trip_and_flatten(tmp_path):
    cfg = from_dict(Stage, {"name": "s2", "optim": {"lr": 1e-5}})
    assert from_dict(Stage, to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["optim.lr"] == 1e-5 and flat["name"] == "s2"


def test_absolute_paths_refused():
    assert check_relative("data/x", "data.train") == "data/x"
    with pytest.raises(ConfigError, match="data.train: absolute paths"):
        check_relative("/abs/x", "data.train")
