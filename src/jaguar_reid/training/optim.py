"""Optimiser, learning-rate schedule and weight averaging for training.

AdamW with layer-wise learning-rate decay over the backbone (the top layer at `train.lr`, each
layer below it `train.layer_decay` times the one above: pretrained low-level filters move least)
and `train.head_lr` for the fresh layers (GeM, neck, head). No weight decay on norms, biases,
GeM's exponent, position embeddings or class tokens. Warm-up then cosine, per part: during the
head-only warm-up (`train.freeze_epochs`) the backbone's rate is 0 and its own warm-up starts
when it is unfrozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from jaguar_reid.config import Config


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up from 1/warmup to 1, then cosine decay to 0 at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def backbone_param_groups(backbone: nn.Module, lr: float, weight_decay: float,
                          layer_decay: float) -> list[dict]:
    """timm's layer grouping (its `group_matcher`, the same one timm's own optimiser factory
    uses) with lr = `lr` x the layer's scale; no decay on 1-d parameters and on what the model
    lists in `no_weight_decay()`."""
    no_decay = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
    groups = param_groups_layer_decay(backbone, weight_decay=weight_decay,
                                      no_weight_decay_list=no_decay, layer_decay=layer_decay)
    out = []
    for group in groups:
        out.append({"params": list(group["params"]), "lr": lr * group.get("lr_scale", 1.0),
                    "weight_decay": group["weight_decay"], "part": "backbone"})
    return out


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups (see the module docstring)."""
    groups = backbone_param_groups(model.backbone, cfg.train.lr, cfg.train.weight_decay,
                                   cfg.train.layer_decay)
    fresh: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, param in model.named_parameters():
        if not name.startswith("backbone.") and param.requires_grad:
            fresh[param.ndim > 1].append(param)
    for decays, params in fresh.items():
        if params:
            groups.append({"params": params, "lr": cfg.train.head_lr,
                           "weight_decay": cfg.train.weight_decay if decays else 0.0,
                           "part": "head"})
    return torch.optim.AdamW(groups)


def lr_lambdas(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
               frozen_steps: int) -> list[Callable[[int], float]]:
    """One schedule factor per parameter group: the head's from step 0; the backbone's is 0
    while frozen, then its own warm-up and cosine over the steps that are left."""
    def head(step: int) -> float:
        return cosine_with_warmup(step, total_steps, warmup_steps)

    def backbone(step: int) -> float:
        if step < frozen_steps:
            return 0.0
        return cosine_with_warmup(step - frozen_steps, total_steps - frozen_steps, warmup_steps)

    return [backbone if g.get("part") == "backbone" else head for g in optimizer.param_groups]


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, clip_grad: float) -> None:
    """One optimiser step on the accumulated gradients, then zero them. With an fp16 loss
    scaler the gradients are unscaled before clipping (the clip is on true gradients), and a
    step whose gradients overflowed is skipped by the scaler."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class ModelEma:
    """Exponential moving average of a model's weights (floating tensors; other buffers are
    copied). The decay ramps up as (1 + n) / (10 + n) towards `decay`, so a short run is not
    an average dominated by its random start."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if value.dtype.is_floating_point:
                shadow.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones after."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(backup)
