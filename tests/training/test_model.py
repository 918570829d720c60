"""Model pieces against hand computations; backbones from local files, never the hub."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from jaguar_reid.config import load_config
from jaguar_reid.training.model import (
    ArcFace,
    GeM,
    build_model,
    create_backbone,
    dynamic_margins,
    load_trained_model,
)
from tests.helpers import SHARED

SHARED_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.safetensors"


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


def test_subcenter_arcface_takes_the_closest_centre():
    head = ArcFace(2, 2, s=1.0, m=0.0, subcenters=3)
    with torch.no_grad():  # class 0: centres at 0, 90 and 180 degrees; class 1: 45, 135, 270
        head.weight.copy_(torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0],
                                        [1.0, 1.0], [-1.0, 1.0], [0, -1.0]]))
    emb = torch.tensor([[0.0, 1.0], [-1.0, -0.1]])
    cos = head.cosine(emb)
    by_hand = (F.normalize(emb) @ F.normalize(head.weight.detach()).T).view(2, 2, 3).amax(2)
    assert torch.allclose(cos, by_hand)
    assert cos[0, 0].item() == pytest.approx(1.0)  # the 90-degree centre of class 0
    # With m = 0 the logits are the cosines (times s), whatever the labels.
    assert torch.allclose(head(emb, torch.tensor([0, 1])), cos, atol=1e-3)


def test_dynamic_margins_are_larger_for_rarer_identities():
    margins = dynamic_margins([1, 4, 16, 100], m_max=0.5, m_min=0.2)
    assert margins[0] == pytest.approx(0.5) and margins[-1] == pytest.approx(0.2)
    assert np.all(np.diff(margins) < 0)
    w = np.array([1, 4, 16, 100]) ** -0.25
    assert np.allclose(margins, 0.2 + 0.3 * (w - w.min()) / (w.max() - w.min()))
    assert np.allclose(dynamic_margins([5, 5], 0.4, 0.1), [0.4, 0.4])
    with pytest.raises(ValueError):
        dynamic_margins([3, 0], 0.5, 0.2)
    # Per-class margins reach the logits: each row's target uses its own class's margin.
    head = ArcFace(2, 2, s=1.0, m=0.5, margins=[0.1, 0.4])
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    emb = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    logits = head(emb, torch.tensor([0, 1]))
    assert logits[0, 0].item() == pytest.approx(math.cos(math.pi / 4 + 0.1), abs=1e-5)
    assert logits[1, 1].item() == pytest.approx(math.cos(math.pi / 4 + 0.4), abs=1e-5)


def test_vit_token_choices_and_retrieval_embeddings(tiny_cfg_args):
    vit = [*tiny_cfg_args, "model.backbone=eva02_tiny_patch14_224", "data.img_size=28"]
    x = torch.rand(2, 3, 28, 28)
    widths = {}
    for tokens in ("patches", "cls", "both"):
        model = build_model(load_config([*vit, f"model.tokens={tokens}"]), n_classes=3).eval()
        widths[tokens] = model.pooled(x).shape[1]
        features = model.backbone.forward_features(x)
        if tokens == "cls":
            assert torch.allclose(model.pooled(x), features[:, 0])
        if tokens == "patches":
            assert torch.allclose(model.pooled(x), model.pool(features[:, 1:]))
    assert widths["both"] == 2 * widths["patches"] == 2 * widths["cls"]

    out = model.embed(x)
    assert out["neck"].shape == (2, 32) and out["backbone"].shape == (2, 2 * widths["cls"])
    for emb in out.values():
        assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out["neck"], F.normalize(model(x)), atol=1e-5)
    # `both`: its cosine is the mean of the two cosines.
    cos = {k: (v[0] @ v[1]).item() for k, v in out.items()}
    assert cos["both"] == pytest.approx((cos["neck"] + cos["backbone"]) / 2, abs=1e-5)

    cnn = build_model(load_config([*tiny_cfg_args, "model.tokens=cls"]), n_classes=3)
    assert cnn.pooled(torch.rand(2, 3, 32, 32)).shape == (2, 512)  # CNNs ignore `tokens`
    dropout = build_model(load_config([*tiny_cfg_args, "model.neck_dropout=0.4"]), n_classes=3)
    assert dropout.neck[0].p == 0.4


def test_subcenter_dynamic_model_round_trips(tmp_path, tiny_cfg_args):
    cfg = load_config([*tiny_cfg_args, "model.subcenters=3", "model.dynamic_margin=true",
                       "model.arcface_m=0.5", "model.arcface_m_min=0.2"])
    model = build_model(cfg, n_classes=4, counts=[1, 2, 5, 9]).eval()
    assert model.head.weight.shape == (12, cfg.model.embed_dim)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = load_trained_model(cfg, path)
    assert torch.equal(again.head.margins, model.head.margins)
    assert again.head.margins[0] > again.head.margins[-1]
    with pytest.raises(ValueError, match="does not fit"):
        load_trained_model(load_config([*tiny_cfg_args, "model.subcenters=2"]), path)


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pth_and_bin_weights_load_and_pickled_code_is_refused(tmp_path):
    source = create_backbone(load_config(["model.backbone=resnet18", "data.img_size=32"]))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    for suffix in (".pth", ".bin"):
        torch.save(state, tmp_path / f"w{suffix}")
        cfg = load_config(["model.backbone=resnet18", f"model.weights={tmp_path / f'w{suffix}'}"])
        loaded = create_backbone(cfg).state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in ("conv1.weight", "layer4.1.bn2.bias"))
    marker = tmp_path / "ran"
    evil = {"conv1.weight": state["conv1.weight"], "x": _Payload(marker)}
    torch.save(evil, tmp_path / "evil.pth")
    cfg = load_config(["model.backbone=resnet18", f"model.weights={tmp_path / 'evil.pth'}"])
    with pytest.raises(ValueError, match=r"evil\.pth cannot be read as plain weights"):
        create_backbone(cfg)
    assert not marker.exists()


def test_register_tokens_are_left_out_of_the_patch_pooling(tiny_cfg_args):
    """DINOv2 with registers (configs/dinov2l_448.yaml): the class token and the 4 registers
    lead the sequence; GeM must pool the patch tokens alone, and `cls` take the class token."""
    cfg = load_config([*tiny_cfg_args, "model.backbone=vit_small_patch14_reg4_dinov2",
                       "data.img_size=28", "model.tokens=both"])
    model = build_model(cfg, n_classes=3).eval()
    assert model.n_prefix_tokens == 5  # 1 class token + 4 registers
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)
        assert tokens.shape[1] == 5 + (28 // 14) ** 2
        patches = tokens[:, 5:].float().clamp(min=model.pool.eps)
        p = model.pool.p.clamp(min=1.0)
        expected = torch.cat([patches.pow(p).mean(dim=1).pow(1.0 / p), tokens[:, 0].float()],
                             dim=1)
        assert torch.allclose(model.pooled(x), expected, atol=1e-5)


def test_dinov2_config_is_the_recipe_with_its_own_normalisation():
    from jaguar_reid.data.preprocess import resolve_input

    cfg = resolve_input(load_config(["config=configs/dinov2l_448.yaml"]))
    assert cfg.model.backbone == "vit_large_patch14_reg4_dinov2.lvd142m"
    assert cfg.data.img_size == 448 and cfg.data.img_size % 14 == 0
    # ImageNet's statistics (timm's pretrained config), not EVA-02's CLIP ones.
    assert cfg.data.mean == pytest.approx([0.485, 0.456, 0.406])
    assert cfg.data.std == pytest.approx([0.229, 0.224, 0.225])


def glam_global_by_loops(glam, x: np.ndarray) -> np.ndarray:
    """GLAM's global branch for one map (C, H, W), written with explicit sums."""
    c, h, w = x.shape
    pooled = x.reshape(c, -1).mean(axis=1)

    def conv1d(weight, v):  # a 1-d cross-correlation with zero padding, like Conv1d
        k = len(weight)
        padded = np.pad(v, k // 2)
        return np.array([sum(weight[t] * padded[i + t] for t in range(k)) for i in range(len(v))])

    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    q = sigmoid(conv1d(glam.global_query.weight.detach().numpy()[0, 0], pooled))
    k = sigmoid(conv1d(glam.global_key.weight.detach().numpy()[0, 0], pooled))
    att = np.exp(np.outer(k, q))
    att /= att.sum(axis=1, keepdims=True)  # row c: how channel c spreads over the channels
    flat = x.reshape(c, -1)
    global_c = np.array([[sum(flat[a, p] * att[a, b] for a in range(c)) for p in range(h * w)]
                         for b in range(c)])
    wq = glam.global_qkv.weight.detach().numpy()[:, :, 0, 0]
    bq = glam.global_qkv.bias.detach().numpy()
    qkv = wq @ flat + bq[:, None]
    r = len(qkv) // 3
    qq, kk, vv = qkv[:r], qkv[r:2 * r], qkv[2 * r:]
    out = np.zeros_like(vv)
    for p in range(h * w):  # position p: a softmax mixture of every position's value
        scores = np.array([qq[:, p] @ kk[:, s] for s in range(h * w)])
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[:, p] = sum(weights[s] * vv[:, s] for s in range(h * w))
    wo = glam.global_out.weight.detach().numpy()[:, :, 0, 0]
    spatial = wo @ out + glam.global_out.bias.detach().numpy()[:, None]
    return (global_c * spatial + global_c).reshape(c, h, w)


def test_glam_global_branch_matches_loops_and_fusion_weights_apply():
    from jaguar_reid.training.model import GLAM

    torch.manual_seed(0)
    glam = GLAM(6, reduction=2).eval()
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    glam = glam.double()
    with torch.no_grad():
        glam.fusion.copy_(torch.tensor([-1e4, -1e4, 0.0]))  # the global branch alone
        got = glam(x)[0].numpy()
    assert np.allclose(got, glam_global_by_loops(glam, x[0].numpy()), atol=1e-9)
    with torch.no_grad():
        glam.fusion.copy_(torch.tensor([-1e4, 0.0, -1e4]))  # the identity alone
        assert torch.allclose(glam(x), x)
        glam.fusion.zero_()  # as trained from: the three maps equally
    assert glam(x).shape == x.shape


def test_attention_before_pooling_for_cnns_and_vits(tmp_path, tiny_cfg_args):
    """CNN maps and ViT patch tokens laid on their grid go through GLAM before GeM; the
    attention is a fresh layer (head learning rate), saved and loaded with the model; weights
    saved without it are refused by name."""
    from jaguar_reid.training.optim import build_optimizer

    vit = [*tiny_cfg_args, "model.backbone=eva02_tiny_patch14_224", "data.img_size=28",
           "model.attention=glam"]
    model = build_model(load_config(vit), n_classes=3).eval()
    x = torch.rand(2, 3, 28, 28)
    tokens = model.backbone.forward_features(x)[:, 1:]
    grid = model.patch_grid(tokens)
    assert grid.shape == (2, tokens.shape[2], 2, 2)
    assert torch.equal(grid[:, :, 1, 0], tokens[:, 2])  # row-major: token r * W + c
    assert torch.allclose(model.pooled(x), model.pool(model.attention(grid)), atol=1e-6)
    with pytest.raises(ValueError, match="tokens=cls leaves out"):
        build_model(load_config([*vit, "model.tokens=cls"]), n_classes=3)

    cfg = load_config([*tiny_cfg_args, "model.attention=glam"])
    cnn = build_model(cfg, n_classes=4).eval()
    images = torch.rand(2, 3, 32, 32)
    features = cnn.backbone.forward_features(images)
    assert torch.allclose(cnn.pooled(images), cnn.pool(cnn.attention(features)), atol=1e-6)
    assert not torch.allclose(cnn.pooled(images), cnn.pool(features), atol=1e-3)
    head_params = {id(p) for g in build_optimizer(cnn, cfg).param_groups if g["part"] == "head"
                   for p in g["params"]}
    assert all(id(p) in head_params for p in cnn.attention.parameters())
    path = tmp_path / "glam.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(path))
    again = load_trained_model(cfg, path).eval()
    assert torch.allclose(cnn(images), again(images), atol=1e-6)
    plain = build_model(load_config(tiny_cfg_args), n_classes=4)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()},
              str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        load_trained_model(cfg, tmp_path / "plain.safetensors")
