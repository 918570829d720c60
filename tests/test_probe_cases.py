"""Cases an adversarial probe of the finished code found handled wrongly, each now one line
naming the key or file (exit 2), never a traceback or a silent result."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from jaguar_reid import cli, layout
from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.io_utils import DamagedFileError, read_json
from jaguar_reid.training.loop import TrainingDiverged
from jaguar_reid.training.model import WeightsError, create_backbone
from tests.helpers import TINY_ARGS, base_args, fake_experiment, make_data


@pytest.mark.parametrize("arg, key", [
    ("seed=-1", "seed"), ("seed=99999999999", "seed"), ("folds.seed=-5", "folds.seed"),
    ("train.batch_size=1", "train.batch_size"), ("exps=,", "exps"),
    ("submit.weights=[0,0]", "submit.weights")])
def test_values_that_used_to_crash_later_are_refused_by_the_config(arg, key):
    extra = ["exps=a,b"] if arg.startswith("submit.weights") else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([*extra, arg])


def test_weights_holding_nan_are_refused_before_training(tmp_path):
    state = timm.create_model("resnet10t").state_dict()
    state["conv1.0.weight"] = torch.full_like(state["conv1.0.weight"], float("nan"))
    path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    cfg = load_config(["config=configs/demo.yaml", f"model.weights={path}"])
    with pytest.raises(WeightsError, match=r"nan\.safetensors holds NaN or infinite values in 1 "
                                           r"tensor\(s\) \(conv1\.0\.weight\)"):
        create_backbone(cfg)


def test_a_diverged_training_is_a_users_error():
    assert issubclass(TrainingDiverged, ValueError) and issubclass(TrainingDiverged,
                                                                  FloatingPointError)


@pytest.mark.parametrize("text", ["", "{'fold': 0", "\x00\x01"])
def test_a_damaged_json_file_is_named(tmp_path, text):
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(DamagedFileError, match=r"metrics\.json: not valid JSON"):
        read_json(path)


def test_an_emptied_postprocess_choice_stops_submit_in_one_line(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    args = [*TINY_ARGS, *base_args(data, tmp_path, "exp=e", "submit.folds=0")]
    fake_experiment(args)
    choice = layout.work_dir(load_config(args)) / layout.POST_CHOICE
    choice.write_text("")
    with pytest.raises(SystemExit) as info:
        cli.run_step("submit", args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: {choice}: not valid JSON")


def test_a_number_yaml_reads_as_text_is_taken_as_the_number(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("base: default.yaml\ntrain:\n  lr: 1e-3\n  epochs: '3'\n")
    cfg = load_config([f"config={path}"])
    assert (cfg.train.lr, cfg.train.epochs) == (0.001, 3)
    path.write_text("train:\n  epochs: 1.5\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config([f"config={path}"])


def test_a_folder_where_an_output_belongs_is_named(tmp_path):
    from jaguar_reid import commit

    (tmp_path / "submission.csv").mkdir()
    with pytest.raises(commit.CommitError, match=r"submission\.csv: cannot be put in place"):
        commit.commit_together({tmp_path / "submission.csv": lambda p: p.write_text("x")},
                               "submission.csv")


@pytest.mark.slow
def test_an_overwrite_unfinishes_the_fold_before_writing_anything(tmp_path, monkeypatch):
    from jaguar_reid import train
    from jaguar_reid.training import loop

    args = [*TINY_ARGS, *base_args(make_data(tmp_path / "data"), tmp_path,
                                   "train.batch_size=4", "fold=0")]
    train.main(args)
    fold = layout.fold_dir(layout.model_dir(load_config(args)), 0)
    assert layout.is_finished(fold)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # the retraining dies before its first epoch ends
    monkeypatch.setattr(loop, "build_parts", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main([*args, "train.overwrite=true"])
    assert not layout.is_finished(fold)  # never the earlier metrics beside a new log


def test_train_init_naming_its_own_experiment_is_refused():
    with pytest.raises(ConfigError, match="train.init' names this experiment"):
        load_config(["exp=e", "train.init=e"])


def test_weights_that_are_a_folder_are_named(tmp_path):
    cfg = load_config(["config=configs/demo.yaml", f"model.weights={tmp_path}"])
    with pytest.raises(WeightsError, match="is a folder; expected a weights file"):
        create_backbone(cfg)


def test_models_naming_no_folder_says_so(tmp_path):
    from jaguar_reid.manifest import ManifestError, verify_manifest

    with pytest.raises(ManifestError, match="no such experiment folder"):
        verify_manifest(tmp_path / "nowhere", required=True)
