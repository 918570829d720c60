"""Optimiser groups (layer-wise decay, no decay on norms), schedules, EMA, the fp16 step."""

import pytest
import torch
from torch import nn

from jaguar_reid.config import load_config
from jaguar_reid.training.model import build_model
from jaguar_reid.training.optim import ModelEma, build_optimizer, lr_lambdas, optimizer_step

VIT = ["model.backbone=eva02_tiny_patch14_224", "data.img_size=28", "model.embed_dim=16",
       "model.grad_checkpointing=false", "device=cpu"]


def settings(optimizer):
    return {id(p): (g["lr"], g["weight_decay"], g["part"]) for g in optimizer.param_groups
            for p in g["params"]}


def test_layer_wise_decay_and_no_decay_lists():
    cfg = load_config([*VIT, "train.lr=1e-4", "train.head_lr=1e-2", "train.weight_decay=0.05",
                       "train.layer_decay=0.5"])
    model = build_model(cfg, n_classes=3)
    setting = settings(build_optimizer(model, cfg))
    names = dict(model.named_parameters())
    assert len(setting) == len(names)  # every parameter exactly once
    depth = len(model.backbone.blocks)
    lr = {name: setting[id(p)][0] for name, p in names.items()}
    # timm's grouping: the last block and the final norm on top at lr, each block below half
    # the one above, the patch embedding (with position embedding, class token) lowest.
    assert lr["backbone.norm.weight"] == pytest.approx(1e-4)
    for b in range(depth):
        assert lr[f"backbone.blocks.{b}.attn.proj.weight"] == pytest.approx(
            1e-4 * 0.5 ** (depth - 1 - b))
    for name in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert lr[f"backbone.{name}"] == pytest.approx(1e-4 * 0.5 ** depth)
    for name, param in names.items():
        rate, decay, part = setting[id(param)]
        if not name.startswith("backbone."):
            assert (rate, part) == (1e-2, "head"), name
        no_decay = param.ndim <= 1 or name in ("backbone.pos_embed", "backbone.cls_token")
        assert decay == (0.0 if no_decay else 0.05), name


def test_schedules_per_part_with_a_frozen_backbone():
    cfg = load_config([*VIT, "train.layer_decay=1.0"])
    model = build_model(cfg, n_classes=3)
    optimizer = build_optimizer(model, cfg)
    lambdas = lr_lambdas(optimizer, total_steps=20, warmup_steps=2, frozen_steps=10)
    parts = [g["part"] for g in optimizer.param_groups]
    backbone, head = lambdas[parts.index("backbone")], lambdas[parts.index("head")]
    assert [backbone(s) for s in range(10)] == [0.0] * 10
    assert backbone(10) == pytest.approx(0.5) and backbone(11) == pytest.approx(1.0)
    assert head(0) == pytest.approx(0.5) and head(1) == pytest.approx(1.0)
    assert head(20) == pytest.approx(0.0) and backbone(20) == pytest.approx(0.0)


def test_ema_follows_its_formula_and_swaps_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected = start["0.weight"].clone()
    for step in range(1, 40):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(4, 3))  # moves the BatchNorm statistics and its counter
        ema.update(model)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * model[0].weight.detach()
        assert torch.allclose(ema.shadow["0.weight"], expected, atol=1e-5)
    assert torch.equal(ema.shadow["1.num_batches_tracked"], model[1].num_batches_tracked)
    own = model[0].weight.detach().clone()
    with ema.applied(model):
        assert torch.allclose(model[0].weight, expected, atol=1e-5)
    assert torch.equal(model[0].weight, own)
    restored = ModelEma(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == ema.updates and torch.equal(restored.shadow["0.weight"],
                                                           ema.shadow["0.weight"])


def _grads(model, scale):
    torch.manual_seed(1)
    x = torch.randn(8, 4)
    loss = model(x).pow(2).sum() * scale
    return loss


def test_fp16_scaler_step_unscales_before_clipping_and_skips_overflow():
    """The loss scaler's path gives the very update of the plain path (clip on true
    gradients), and a step whose gradients hold inf leaves the weights alone."""
    updates = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        loss = _grads(model, 1.0)
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(model, optimizer, scaler, clip_grad=0.5)
        assert all(p.grad is None for p in model.parameters())
        updates.append(model.weight.detach().clone())
    assert torch.allclose(updates[0], updates[1], atol=1e-6)

    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(_grads(model, float("inf"))).backward()
    optimizer_step(model, optimizer, scaler, clip_grad=0.5)
    assert torch.equal(model.weight, before)
    assert scaler.get_scale() == 2.0**9  # backed off for the next step
