"""Model pieces against hand computations; backbones from local files, never the hub."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from src.config import load_config
from src.model import ArcFace, GeM, build_model, create_backbone, load_trained_model

SHARED_WEIGHTS = (Path(__file__).resolve().parents[2] / "shared" / "weights"
                  / "tf_efficientnet_lite0.safetensors")


def test_gem_matches_formula_for_maps_and_tokens():
    torch.manual_seed(0)
    gem = GeM(p=3.0)
    x = torch.rand(2, 5, 4, 4) + 0.1
    expected = (x ** 3).mean(dim=(2, 3)) ** (1 / 3)
    assert torch.allclose(gem(x), expected, atol=1e-6)
    tokens = torch.rand(2, 7, 5) + 0.1
    assert torch.allclose(gem(tokens), (tokens ** 3).mean(dim=1) ** (1 / 3), atol=1e-6)
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)
    assert gem.p.requires_grad
    with pytest.raises(ValueError, match="GeM expects"):
        gem(torch.rand(3, 4))


def test_arcface_logits_by_hand():
    head = ArcFace(4, 3, s=10.0, m=0.3)
    emb = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    labels = torch.tensor([0, 1])
    logits = head(emb, labels)
    theta0 = math.acos(1 / math.sqrt(2))
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(theta0 + 0.3), abs=1e-5)
    assert logits[0, 1].item() == pytest.approx(0.0, abs=1e-5)  # cos 90 degrees, no margin
    # theta = 0 for the true class: cos(0 + m); sine is floored at sqrt(1e-7) to keep the
    # gradient finite, which moves this logit by under 1e-3.
    assert logits[1, 1].item() == pytest.approx(10 * math.cos(0.3), abs=1e-3)
    assert logits[1, 0].item() == pytest.approx(10 / math.sqrt(2), abs=1e-5)


def test_cnn_and_vit_models_embed(tiny_cfg_args):
    for backbone, size in (("resnet18", 32), ("eva02_tiny_patch14_224", 28)):
        cfg = load_config([*tiny_cfg_args, f"model.backbone={backbone}", f"data.img_size={size}"])
        model = build_model(cfg, n_classes=3).eval()
        emb = model(torch.rand(2, 3, size, size))
        assert emb.shape == (2, cfg.model.embed_dim)
        logits = model.head(emb, torch.tensor([0, 2]))
        assert logits.shape == (2, 3)
    assert model.n_prefix_tokens == 1  # EVA-02 has a class token that GeM skips


def test_missing_weights_file_is_named(tmp_path):
    cfg = load_config(["model.backbone=resnet18", f"model.weights={tmp_path / 'nope.pth'}"])
    with pytest.raises(FileNotFoundError, match=r"model\.weights.*nope\.pth"):
        create_backbone(cfg)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="../shared/weights absent")
def test_local_safetensors_weights_are_loaded():
    cfg = load_config(["model.backbone=tf_efficientnet_lite0", f"model.weights={SHARED_WEIGHTS}",
                       "data.img_size=64"])
    backbone = create_backbone(cfg)
    reference = load_file(str(SHARED_WEIGHTS))
    state = backbone.state_dict()
    for key in ("conv_stem.weight", "blocks.3.0.conv_pw.weight", "conv_head.weight"):
        assert torch.equal(state[key], reference[key])


def test_trained_model_round_trips_through_safetensors(tmp_path, tiny_cfg_args):
    cfg = load_config(tiny_cfg_args)
    model = build_model(cfg, n_classes=4).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = load_trained_model(cfg, path).eval()
    x = torch.rand(3, 3, cfg.data.img_size, cfg.data.img_size)
    assert torch.allclose(model(x), again(x), atol=1e-6)
    save_file({"backbone.x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a model saved by this pipeline"):
        load_trained_model(cfg, tmp_path / "other.safetensors")
