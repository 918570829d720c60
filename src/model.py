"""Re-ID network: timm backbone -> GeM pooling -> Linear+BatchNorm neck -> (ArcFace head).

The embedding used for retrieval is the neck's output; the ArcFace head exists only for the
training loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from src.config import Config


class GeM(nn.Module):
    """Generalised mean pooling with a learnable exponent p (p=1: mean, p->inf: max).

    Takes a CNN feature map (B, C, H, W) or ViT patch tokens (B, N, C) and returns (B, C).
    Activations are clamped at `eps` because x**p is undefined for negatives.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        if x.ndim == 4:
            pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3))
        elif x.ndim == 3:
            pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=1)
        else:
            raise ValueError(f"GeM expects (B, C, H, W) or (B, N, C), got shape {tuple(x.shape)}")
        return pooled.pow(1.0 / p)


class ArcFace(nn.Module):
    """Additive angular margin head (Deng et al. 2019): logits s*cos(theta + m) for the true
    class, s*cos(theta) for the others."""

    def __init__(self, in_features: int, n_classes: int, s: float = 30.0, m: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.s = s
        self.m = m
        # Past theta = pi - m, cos(theta + m) stops decreasing; the usual linear extension keeps
        # the target logit monotone in theta.
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))
        sine = torch.sqrt((1.0 - cosine.pow(2)).clamp(min=1e-7))
        phi = cosine * math.cos(self.m) - sine * math.sin(self.m)
        phi = torch.where(cosine > self.th, phi, cosine - self.mm)
        one_hot = F.one_hot(labels, num_classes=self.weight.shape[0]).to(cosine.dtype)
        return self.s * (one_hot * phi + (1.0 - one_hot) * cosine)


def create_backbone(cfg: Config) -> nn.Module:
    """A timm backbone without classifier or pooling, from a local weights file, timm's hub, or
    random initialisation, in that order of preference."""
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    weights = cfg.model.weights
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: file not found: {weights}")
        # timm's own loader: drops the classifier, adapts position embeddings, and reads
        # .pth/.bin with torch.load(weights_only=True).
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    else:
        kwargs["pretrained"] = bool(cfg.model.pretrained)
    try:
        backbone = timm.create_model(cfg.model.backbone, img_size=cfg.data.img_size, **kwargs)
    except TypeError:
        # CNNs take any input size and have no img_size argument.
        backbone = timm.create_model(cfg.model.backbone, **kwargs)
    except RuntimeError as exc:
        raise RuntimeError(f"model.backbone={cfg.model.backbone!r}: {exc}") from exc
    return backbone


class ReIDModel(nn.Module):
    def __init__(self, backbone: nn.Module, embed_dim: int, n_classes: int, gem_p: float,
                 arcface_s: float, arcface_m: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = GeM(gem_p)
        n_features = backbone.num_features
        self.neck = nn.Sequential(nn.Linear(n_features, embed_dim, bias=False),
                                  nn.BatchNorm1d(embed_dim))
        self.head = ArcFace(embed_dim, n_classes, arcface_s, arcface_m)
        # ViTs prepend class/register tokens; GeM pools the patch tokens only.
        self.n_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> embeddings (B, embed_dim), not normalised."""
        features = self.backbone.forward_features(x)
        if features.ndim == 3:
            features = features[:, self.n_prefix_tokens:]
        return self.neck(self.pool(features))


def build_model(cfg: Config, n_classes: int) -> ReIDModel:
    if cfg.model.backbone and not cfg.model.weights and not cfg.model.pretrained:
        print(f"note: {cfg.model.backbone} starts from random initialisation "
              "(set model.weights=PATH to a local weights file)")
    backbone = create_backbone(cfg)
    if cfg.model.grad_checkpointing and hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)
    return ReIDModel(backbone, cfg.model.embed_dim, n_classes, cfg.model.gem_p,
                     cfg.model.arcface_s, cfg.model.arcface_m)


def load_trained_model(cfg: Config, weights_path: str | Path) -> ReIDModel:
    """A trained fold model from its safetensors file (never unpickles anything)."""
    state = load_file(str(weights_path))
    if "head.weight" not in state:
        raise ValueError(f"{weights_path}: not a model saved by this pipeline (no head.weight)")
    n_classes = state["head.weight"].shape[0]
    # The saved weights replace the backbone's, so no pretrained file is needed (or read) here.
    arch_cfg = Config({**cfg, "model": Config({**cfg.model, "weights": "", "pretrained": False,
                                               "grad_checkpointing": False})})
    model = ReIDModel(create_backbone(arch_cfg), cfg.model.embed_dim, n_classes,
                      cfg.model.gem_p, cfg.model.arcface_s, cfg.model.arcface_m)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not fit model.backbone={cfg.model.backbone!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
