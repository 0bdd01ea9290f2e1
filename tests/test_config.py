import json

import pytest

from ptcl.config import build_config, load_file, parse_overrides, save_config
from ptcl.errors import ConfigError


def test_defaults_are_the_embedded_demo():
    cfg = build_config()
    assert (cfg.method.name, cfg.backbone.name, cfg.dataset.name) == ("simplecil", "efficientnet_lite0", "mnist_demo")
    assert cfg.seed == 1993


def test_overrides_dotted_and_shorthand():
    cfg = build_config(None, ["method=finetune", "method.epochs=3", "method.lr=0.5", "dataset.root=/data",
                              "scenario.increment=10", "backbone.image_size=112", "seed=7"])
    assert cfg.method.name == "finetune" and cfg.method.epochs == 3 and cfg.method.lr == 0.5
    assert cfg.dataset.root == "/data" and cfg.scenario.increment == 10
    assert cfg.backbone.image_size == 112 and cfg.seed == 7


def test_method_options_are_the_methods_own():
    with pytest.raises(ConfigError, match=r"unknown key 'method.epochs'.*valid: name"):
        build_config(None, ["method=simplecil", "method.epochs=3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("dataset.rot=/x", r"unknown key 'dataset.rot'; valid: name, root"),
        ("sed=1", r"unknown config key 'sed'; valid: .*seed"),
        ("method=nope", r"unknown method 'nope'; valid: .*simplecil"),
        ("seed=abc", r"seed must be an integer"),
        ("method=finetune method.optimizer=lbfgs", r"bad value 'lbfgs' for method.optimizer; valid: sgd"),
        ("method=finetune method.epochs=0", r"method.epochs must be > 0"),
        ("scenario.shuffle=maybe", r"scenario.shuffle must be true or false"),
        ("noequals", r"not of the form key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(None, override.split())


def test_yaml_json_round_trip(tmp_path):
    cfg = build_config(None, ["method=finetune", "method.epochs=2", "dataset.train_per_class=5"])
    y = tmp_path / "c.yaml"
    y.write_text(save_config(cfg))
    assert build_config(load_file(y)) == cfg
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert build_config(load_file(j)) == cfg


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_file(bad)


def test_parse_overrides_types():
    d = parse_overrides(["a.b=1", "a.c=0.5", "a.d=true", "a.e=null", "a.f=hello"])
    assert d == {"a": {"b": 1, "c": 0.5, "d": True, "e": None, "f": "hello"}}
