"""Starting weights load strictly: a file of another architecture, a partial or mis-shaped one,
a truncated file or a pickle of objects stops with one line naming the file; the right file
(with or without its classifier, plain or wrapped) loads every tensor."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from jaguar_reid import cli
from jaguar_reid.config import load_config
from jaguar_reid.training.model import WeightsError, create_backbone
from tests.helpers import SHARED, TINY_ARGS, base_args, make_data


def _save(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _cfg(weights: Path, backbone: str = "resnet10t", size: int = 64):
    return load_config(["config=configs/demo.yaml", f"model.backbone={backbone}",
                        f"model.weights={weights}", f"data.img_size={size}"])


def test_the_right_file_loads_every_tensor_with_or_without_its_classifier(tmp_path):
    source = timm.create_model("resnet10t")  # with its classifier, as timm's files come
    full = _save(source.state_dict(), tmp_path / "full.safetensors")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "wrapped.pth")
    for path in (full, tmp_path / "wrapped.pth"):
        backbone = create_backbone(_cfg(path))
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, source.state_dict()[key]), (path.name, key)


@pytest.mark.parametrize("make, expected", [
    (lambda d: _save(timm.create_model("test_vit").state_dict(), d / "vit.safetensors"),
     r"vit\.safetensors does not fit model\.backbone='resnet10t': 70 of its 84 tensors "
     r"missing \(.*\), 80 unexpected"),
    (lambda d: _save(dict(list(timm.create_model("resnet10t").state_dict().items())[:13]),
                     d / "part.safetensors"),
     r"part\.safetensors does not fit .*: 59 of its 84 tensors missing"),
    (lambda d: _save(timm.create_model("resnet18").state_dict(), d / "r18.safetensors"),
     r"r18\.safetensors does not fit model\.backbone='resnet10t': size mismatch for"),
])
def test_weights_of_another_model_are_refused(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(WeightsError, match=expected):
        create_backbone(_cfg(path))


def _truncated(d: Path) -> Path:
    good = _save(timm.create_model("resnet10t").state_dict(), d / "good.safetensors")
    path = d / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:5000])
    return path


def _objects(d: Path) -> Path:
    path = d / "objects.pth"
    path.write_bytes(pickle.dumps({"layer": Path("x")}))
    return path


def _empty(d: Path) -> Path:
    path = d / "empty.safetensors"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("make", [_truncated, _objects, _empty])
def test_a_file_that_is_not_weights_is_named_in_one_line(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(WeightsError) as info:
        create_backbone(_cfg(path))
    message = str(info.value)
    assert message.startswith(f"model.weights: {path} cannot be read as plain weights")
    assert "\n" not in message


def test_a_pooled_head_norm_is_said_and_the_rest_loads(tmp_path, capsys):
    """EVA-02's in1k weights normalise after average pooling (fc_norm); this model pools the
    tokens itself: the token norm starts plain, and the user is told."""
    source = timm.create_model("eva02_tiny_patch14_224.mim_in22k", global_pool="avg")
    assert "fc_norm.weight" in source.state_dict()
    path = _save(source.state_dict(), tmp_path / "eva.safetensors")
    backbone = create_backbone(_cfg(path, "eva02_tiny_patch14_224.mim_in22k", 112))
    assert "normalises after average pooling (fc_norm)" in capsys.readouterr().out
    state = backbone.state_dict()
    assert torch.equal(state["norm.weight"], torch.ones_like(state["norm.weight"]))
    assert torch.equal(state["patch_embed.proj.weight"],
                       source.state_dict()["patch_embed.proj.weight"])


def test_train_sh_stops_in_one_line_on_the_wrong_weights(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    vit = _save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.safetensors")
    args = [*TINY_ARGS, *base_args(data, tmp_path, "train.batch_size=4"),
            f"model.weights={vit}", "model.allow_random_init=false", "fold=0"]
    with pytest.raises(SystemExit) as info:
        cli.run_step("train", args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: model.weights: {vit} does not fit model.backbone='resnet18'")


@pytest.mark.shared
def test_the_real_pretrained_backbone_loads_strictly():
    weights = SHARED / "weights" / "tf_efficientnet_lite0.safetensors"
    if not weights.is_file():
        pytest.skip("../shared is absent")
    backbone = create_backbone(_cfg(weights, "tf_efficientnet_lite0", 224))
    assert backbone.conv_stem.weight.abs().sum() > 0
