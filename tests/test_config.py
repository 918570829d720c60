"""Config loading: defaults, base chains, key=value overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from jaguar_reid.config import (
    ConfigError,
    config_digest,
    load_config,
    load_saved_config,
    parse_overrides,
    save_config,
)

REQUIRED_KEYS = ("exp", "data.dir", "data.img_size", "model.backbone", "model.weights",
                 "model.pretrained", "train.epochs", "train.batch_size")


def test_defaults_are_the_competition_recipe():
    cfg = load_config([])
    assert cfg.model.backbone == "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"
    assert cfg.data.img_size == 448
    assert (cfg.model.arcface_s, cfg.model.arcface_m) == (30.0, 0.5)
    assert cfg.model.gem_p == 3.0
    assert cfg.model.weights == "" and cfg.model.pretrained is False


def test_required_keys_exist_under_their_names():
    cfg = load_config([])
    for key in REQUIRED_KEYS:
        cfg.get_path(key)  # KeyError fails the test


def test_demo_config_inherits_and_overrides():
    cfg = load_config(["config=configs/demo.yaml"])
    assert cfg.exp == "demo"
    assert cfg.data.dir == "input/demo"
    assert cfg.model.arcface_s == 30.0  # inherited from default.yaml


def test_cli_overrides_parse_by_the_defaults_type():
    cfg = load_config(["train.epochs=3", "train.lr=1e-4", "model.pretrained=true",
                       "exp=007", "fold=0..4", "data.mean=[0.1, 0.2, 0.3]"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.pretrained is True
    assert cfg.exp == "007"  # text stays text, leading zeros kept
    assert cfg.fold == "0..4"
    assert cfg.data.mean == [0.1, 0.2, 0.3]


def test_int_accepted_for_float_key():
    cfg = load_config(["model.gem_p=4"])
    assert cfg.model.gem_p == 4.0 and isinstance(cfg.model.gem_p, float)


@pytest.mark.parametrize("args, fragment", [
    (["train.epochz=3"], "train.epochz"),
    (["nonsense=1"], "nonsense"),
    (["train.epochs=three"], "train.epochs"),
    (["train.epochs=2.5"], "train.epochs"),
    (["model.pretrained=maybe"], "model.pretrained"),
    (["data.mean=0.5"], "data.mean"),
    (["folds.strategy=random"], "folds.strategy"),
    (["folds.n_folds=1"], "folds.n_folds"),
    (["exp=a/b"], "exp"),
    (["justaword"], "key=value"),
])
def test_bad_overrides_name_the_key(args, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(args)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean train.epochs"):
        load_config(["train.epoch=3"])


def test_yaml_file_unknown_key_and_wrong_type(tmp_path: Path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("base: default.yaml\nmodel:\n  backbon: resnet18\n")
    with pytest.raises(ConfigError, match=r"bad_key.yaml.*model\.backbon"):
        load_config([f"config={bad_key}"])
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("train:\n  batch_size: big\n")
    with pytest.raises(ConfigError, match=r"bad_type.yaml.*train\.batch_size"):
        load_config([f"config={bad_type}"])
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_config([f"config={missing}"])


def test_base_chain_and_loop(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("base: default.yaml\ntrain:\n  epochs: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nexp: bee\n")
    cfg = load_config([f"config={tmp_path / 'b.yaml'}"])
    assert (cfg.exp, cfg.train.epochs) == ("bee", 7)
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config([f"config={tmp_path / 'x.yaml'}"])


def test_saved_config_round_trips(tmp_path: Path):
    cfg = load_config(["config=configs/demo.yaml", "train.epochs=2", "fold=1"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_saved_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_digest(again) == config_digest(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 2


def test_digest_changes_with_any_value():
    assert config_digest(load_config([])) != config_digest(load_config(["train.epochs=3"]))


def test_parse_overrides_keeps_equals_in_values():
    assert parse_overrides(["data.dir=/a=b"]) == [("data.dir", "/a=b")]


@pytest.mark.parametrize("arg,message", [
    ("embed.tta=[orig,flop]", "view 'flop'"),
    ("embed.tta=[]", "embed.tta' needs at least 1"),
    ("embed.tta=[zoom3]", "zooms outside"),
    ("tune.views=[flip,zoomx]", "tune.views"),
    ("tune.k1=[]", "tune.k1' needs at least 1"),
    ("tune.k1=[0]", "tune.k1"),
    ("post.lambda=1.5", "post.lambda"),
    ("post.blend=-0.1", "post.blend"),
    ("post.proto_source=other", "post.proto_source"),
    ("post.on_large=swap", "post.on_large"),
    ("post.rerank_norm=colmax", "post.rerank_norm"),
    ("tune.rerank_norm=[none,colmax]",
     "tune.rerank_norm' must be one of none | rowmax; got 'colmax'"),
    ("tune.rerank_norm=[]", "tune.rerank_norm' needs at least 1"),
    ("submit.ensemble=median", "submit.ensemble"),
    ("tune.dba=[1]", "tune.dba"),
    ("exps=a,a", "twice"),
    ("embed.tta_flip=true", "replaced by 'embed.tta'"),
])
def test_post_processing_keys_are_checked(arg, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config([arg])


def test_experiment_weights_must_match_the_experiments():
    from jaguar_reid.config import experiment_names

    cfg = load_config(["exps=a, b,c", "submit.weights=[1,2,3]"])
    assert experiment_names(cfg) == ["a", "b", "c"]
    assert experiment_names(load_config(["exp=x"])) == ["x"]
    with pytest.raises(ConfigError, match="2 weight"):
        load_config(["exps=a,b,c", "submit.weights=[1,2]"])


def test_a_run_saved_with_a_retired_key_still_loads(tmp_path):
    from jaguar_reid.config import load_saved_config

    saved = tmp_path / "config.yaml"
    saved.write_text("embed:\n  tta_flip: true\n")
    assert load_saved_config(saved).embed.tta == ["orig", "flip"]
    with pytest.raises(ConfigError, match="replaced by 'embed.tta'"):
        load_config([f"config={saved}"])


def test_negative_epochs_are_refused_and_zero_is_a_run():
    from jaguar_reid.config import ConfigError, load_config

    assert load_config(["train.epochs=0"]).train.epochs == 0
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(["train.epochs=-1"])
