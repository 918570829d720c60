"""Re-ID network: timm backbone -> (attention) -> pooling -> (dropout) Linear+BatchNorm neck ->
margin head.

Pooling is GeM over a CNN's feature map, or over a ViT's patch tokens, optionally with the
class token (`model.tokens`). The head (ArcFace, sub-centre ArcFace, per-identity dynamic
margins) exists only for the training loss. Retrieval uses the neck's output, the pooled
backbone features, or both (`model.retrieval`), chosen out of fold: a fresh neck can be worse
than the pretrained features it sits on.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from jaguar_reid.config import Config
from jaguar_reid.io_utils import UserInputError, say_once
from jaguar_reid.keys import choices


class WeightsError(UserInputError):
    """A weights file that cannot be used; the message names it."""

TOKEN_MODES = choices("model.tokens")
RETRIEVAL_MODES = choices("model.retrieval")
ATTENTIONS = choices("model.attention")


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


def eca_kernel(channels: int) -> int:
    """ECA's kernel size for a 1-d convolution across `channels` (Wang et al. 2020): the odd
    number nearest log2(C) / 2 + 1/2, so wider maps look at more neighbouring channels."""
    k = int(abs(math.log2(channels) / 2 + 0.5))
    return k if k % 2 else k + 1


class GLAM(nn.Module):
    """Global-local attention (Song, Han & Avrithis, WACV 2022) on a feature map (B, C, H, W).

    Local: channel weights from a 1-d convolution over the pooled channels (sigmoid), then a
    spatial map from dilated convolutions (rates 1, 3, 5) of a reduced map, applied as x a + x.
    Global: channel-to-channel attention (C x C, softmax) from the pooled channels, then
    position-to-position attention (HW x HW, softmax) on a reduced map, applied the same way.
    Output: the local, identity and global maps mixed with learnt softmax weights, equal at
    the start as in the paper. Returns a map of the input's shape.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        reduced = max(channels // reduction, 1)
        k = eca_kernel(channels)
        self.local_channel = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.local_reduce = nn.Conv2d(channels, reduced, 1)
        self.local_dilated = nn.ModuleList(
            nn.Conv2d(reduced, reduced, 3, padding=d, dilation=d) for d in (1, 3, 5))
        self.local_spatial = nn.Conv2d(4 * reduced, 1, 1)
        self.global_query = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.global_key = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.global_qkv = nn.Conv2d(channels, 3 * reduced, 1)
        self.global_out = nn.Conv2d(reduced, channels, 1)
        self.fusion = nn.Parameter(torch.zeros(3))  # softmax: local, identity, global

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pooled = x.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C)
        # Local: channel weights, then a spatial map of the reweighted features.
        local_c = x * torch.sigmoid(self.local_channel(pooled)).view(b, c, 1, 1)
        r = self.local_reduce(x)
        spatial = self.local_spatial(torch.cat([r, *[conv(r) for conv in self.local_dilated]],
                                               dim=1))
        local = local_c * spatial + local_c
        # Global: every channel a softmax mixture of channels, then every position a softmax
        # mixture of positions.
        query = torch.sigmoid(self.global_query(pooled))  # (B, 1, C)
        key = torch.sigmoid(self.global_key(pooled))
        channel_att = torch.softmax(key.transpose(1, 2) @ query, dim=-1)  # (B, C, C)
        global_c = (x.flatten(2).transpose(1, 2) @ channel_att).transpose(1, 2).view(b, c, h, w)
        q, k_, v = self.global_qkv(x).flatten(2).chunk(3, dim=1)  # each (B, C', HW)
        position_att = torch.softmax(q.transpose(1, 2) @ k_, dim=-1)  # (B, HW, HW)
        spatial_g = self.global_out((v @ position_att.transpose(1, 2)).view(b, -1, h, w))
        glob = global_c * spatial_g + global_c
        weight = torch.softmax(self.fusion, dim=0)
        return weight[0] * local + weight[1] * x + weight[2] * glob


def dynamic_margins(counts: Sequence[int], m_max: float, m_min: float,
                    power: float = 0.25) -> np.ndarray:
    """Per-identity margins from image counts: n**-power rescaled so the rarest identity gets
    `m_max` and the commonest `m_min` (dynamic margins of the Google Landmark 2020 winners:
    a rare class has few samples to pull its centre, so it is asked for a wider gap)."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) == 0 or (counts < 1).any():
        raise ValueError("dynamic margins need a count of at least 1 for every identity")
    weight = counts ** -power
    span = weight.max() - weight.min()
    if span == 0:
        return np.full(len(counts), m_max)
    return m_min + (m_max - m_min) * (weight - weight.min()) / span


class ArcFace(nn.Module):
    """Additive angular margin head (Deng et al. 2019): logits s*cos(theta + m) for the true
    class, s*cos(theta) for the others.

    `subcenters` k > 1 gives sub-centre ArcFace (Deng et al. 2020): k centres per identity, the
    class cosine is the closest centre's, so a few odd pictures do not drag the main centre.
    `margins` (one per class) replaces the single m, for dynamic margins.
    """

    def __init__(self, in_features: int, n_classes: int, s: float = 30.0, m: float = 0.5,
                 subcenters: int = 1, margins: Sequence[float] | None = None) -> None:
        super().__init__()
        if subcenters < 1:
            raise ValueError(f"subcenters must be at least 1; got {subcenters}")
        self.n_classes, self.subcenters, self.s = n_classes, subcenters, s
        self.weight = nn.Parameter(torch.empty(n_classes * subcenters, in_features))
        nn.init.xavier_uniform_(self.weight)
        per_class = torch.full((n_classes,), float(m)) if margins is None else \
            torch.as_tensor(margins, dtype=torch.float32)
        if per_class.shape != (n_classes,):
            raise ValueError(f"{len(per_class)} margins for {n_classes} classes")
        # A buffer: saved with the weights, so a loaded model keeps its margins.
        self.register_buffer("margins", per_class.float())

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, n_classes) cosine to each class (its closest sub-centre)."""
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))
        if self.subcenters > 1:
            cos = cos.view(-1, self.n_classes, self.subcenters).amax(dim=2)
        return cos

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.cosine(emb)
        m = self.margins[labels].unsqueeze(1)  # (B, 1): each sample's own class margin
        target = cosine.gather(1, labels.unsqueeze(1))
        sine = torch.sqrt((1.0 - target.pow(2)).clamp(min=1e-7))
        phi = target * torch.cos(m) - sine * torch.sin(m)
        # Past theta = pi - m, cos(theta + m) stops decreasing; the usual linear extension keeps
        # the target logit monotone in theta.
        phi = torch.where(target > torch.cos(torch.pi - m), phi,
                          target - torch.sin(torch.pi - m) * m)
        return self.s * cosine.scatter(1, labels.unsqueeze(1), phi)


def read_weights_file(path: Path, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """The tensors of a local weights file (.safetensors, or a .pth / .bin read with
    `weights_only`: a pickle can carry code and never runs here), unwrapped from a training
    checkpoint's `state_dict` / `model` entry; anything else is one line naming the file."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # its protocol notice is no concern of the user's
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not weights, a pickle of objects: all one answer
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise WeightsError(f"{key}: {path} cannot be read as plain weights "
                           f"({type(exc).__name__}: {reason}); give a .safetensors file, or a "
                           ".pth / .bin holding a state dict of tensors") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{key}: {path} holds no state dict of tensors (got "
                           f"{type(state).__name__}); give the backbone's weights file")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classifier_keys(backbone: nn.Module) -> set[str]:
    """The keys of the classifier timm's pretrained config names: a pretrained file holds them,
    the backbone built without a classifier does not; they are the only keys dropped."""
    names = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {f"{name}.{part}" for name in names for part in ("weight", "bias")}


def _listed(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _converted(backbone: nn.Module, state: dict, path: Path, name: str) -> dict:
    """timm's own conversion for the architecture (`checkpoint_filter_fn`: original key names,
    position embeddings resampled to data.img_size), as timm's loader runs it."""
    filter_fn = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, backbone)
    except Exception as exc:  # a file the conversion cannot read is another model's
        raise WeightsError(f"model.weights: {path} does not fit model.backbone={name!r} "
                           f"(timm's conversion failed: {type(exc).__name__})") from None


_TOKEN_NORM, _HEAD_NORM = ("norm.weight", "norm.bias"), ("fc_norm.weight", "fc_norm.bias")


def _head_norm_moved(missing: list[str], unexpected: list[str], path: Path
                     ) -> tuple[list[str], list[str]]:
    """The one mismatch accepted beside the classifier: a ViT fine-tuned with average pooling
    (EVA-02's in1k weights) keeps its last LayerNorm after pooling (`fc_norm`), while this
    model pools the tokens itself and normalises them first (`norm`). As timm's loader does,
    `norm` starts as a plain LayerNorm (weight 1, bias 0) and `fc_norm` is left out: said, not
    silent."""
    if set(_TOKEN_NORM) <= set(missing) and set(_HEAD_NORM) <= set(unexpected):
        say_once(f"model.weights: {path} normalises after average pooling (fc_norm); this "
                 "model pools the tokens itself: its token norm starts as a plain LayerNorm, "
                 "fc_norm is not used")
        return ([k for k in missing if k not in _TOKEN_NORM],
                [k for k in unexpected if k not in _HEAD_NORM])
    return missing, unexpected


def load_start_weights(backbone: nn.Module, path: Path, name: str) -> None:
    """Load a local weights file into `backbone` (built without classifier), strictly: every
    tensor of the backbone comes from the file, and the file holds nothing else but the
    classifier (and a pooled head's norm, `_head_norm_moved`); a file of another architecture,
    partial or mis-shaped, is one line naming the file (timm's loader would warn and keep
    random weights for what did not fit)."""
    state = _converted(backbone, read_weights_file(path), path, name)
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise WeightsError(f"model.weights: {path} holds NaN or infinite values in "
                           f"{len(broken)} tensor(s) ({_listed(broken)}); the file is damaged")
    state = {k: v for k, v in state.items() if k not in _classifier_keys(backbone)}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes
        lines = str(exc).splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0])
        raise WeightsError(f"model.weights: {path} does not fit model.backbone={name!r}: "
                           f"{detail[:200]}") from None
    missing, unexpected = _head_norm_moved(list(result.missing_keys),
                                           list(result.unexpected_keys), path)
    if missing or unexpected:
        raise WeightsError(
            f"model.weights: {path} does not fit model.backbone={name!r}: {len(missing)} of its "
            f"{len(backbone.state_dict())} tensors missing ({_listed(missing)}), "
            f"{len(unexpected)} unexpected ({_listed(unexpected)}); are these the weights of "
            "another model?")


def create_backbone(cfg: Config, global_pool: str = "", own_size: bool = False) -> nn.Module:
    """A timm backbone without classifier (and without pooling unless `global_pool` names
    timm's), from a local weights file, timm's hub, or random initialisation, in that order of
    preference; at `data.img_size`, or at the backbone's own input size with `own_size`."""
    kwargs: dict = {"num_classes": 0, "global_pool": global_pool}
    weights = cfg.model.weights
    path = Path(weights) if weights else None
    if path is not None and path.is_dir():
        raise WeightsError(f"model.weights: {weights} is a folder; expected a weights file")
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"model.weights: file not found: {weights}")
    # A local file is loaded below, strictly: timm's own loader accepts a partial match.
    kwargs["pretrained"] = bool(cfg.model.pretrained) and path is None
    try:
        size = {} if own_size else {"img_size": cfg.data.img_size}
        backbone = timm.create_model(cfg.model.backbone, **size, **kwargs)
    except TypeError:
        # CNNs take any input size and have no img_size argument.
        backbone = timm.create_model(cfg.model.backbone, **kwargs)
    except RuntimeError as exc:
        raise RuntimeError(f"model.backbone={cfg.model.backbone!r}: {exc}") from exc
    if path is not None:
        load_start_weights(backbone, path, cfg.model.backbone)
    return backbone


class RandomInitError(UserInputError):
    """Training would start a backbone from random weights without being asked to."""


class ReIDModel(nn.Module):
    def __init__(self, backbone: nn.Module, embed_dim: int, head: nn.Module, gem_p: float = 3.0,
                 tokens: str = "patches", neck_dropout: float = 0.0, attention: str = "none",
                 glam_reduction: int = 8) -> None:
        super().__init__()
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {', '.join(TOKEN_MODES)}; got {tokens!r}")
        if attention != "none" and tokens == "cls" and hasattr(backbone, "patch_embed"):
            raise ValueError(f"model.attention={attention} attends over the patch grid, which "
                             "model.tokens=cls leaves out; use tokens=patches or both")
        self.backbone = backbone
        self.pool = GeM(gem_p)
        # Attention is a fresh layer: absent (None) keeps the state dict of models without it.
        self.attention = (GLAM(backbone.num_features, glam_reduction)
                          if attention == "glam" else None)
        # ViTs prepend class/register tokens; GeM pools the patch tokens only.
        self.n_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        self.has_cls = bool(getattr(backbone, "cls_token", None) is not None)
        self.tokens = tokens
        self.n_features = backbone.num_features * (2 if tokens == "both" else 1)
        self.neck = nn.Sequential(nn.Dropout(neck_dropout),
                                  nn.Linear(self.n_features, embed_dim, bias=False),
                                  nn.BatchNorm1d(embed_dim))
        self.head = head

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled backbone features (B, n_features), float32."""
        features = self.backbone.forward_features(x)
        if features.ndim == 4:  # CNN feature map: `tokens` does not apply
            return self.pool(features if self.attention is None else self.attention(features))
        if self.tokens != "patches" and not self.has_cls:
            raise ValueError(f"model.tokens={self.tokens!r} needs a class token, which this "
                             "backbone does not have")
        parts = []
        if self.tokens in ("patches", "both"):
            patches = features[:, self.n_prefix_tokens:]
            if self.attention is not None:
                patches = self.attention(self.patch_grid(patches))
            parts.append(self.pool(patches))
        if self.tokens in ("cls", "both"):
            parts.append(features[:, 0].float())
        return torch.cat(parts, dim=1)

    def patch_grid(self, patches: torch.Tensor) -> torch.Tensor:
        """ViT patch tokens (B, N, C) laid back on their grid: (B, C, H, W)."""
        grid = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
        b, n, c = patches.shape
        if grid is None or grid[0] * grid[1] != n:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"model.attention: {n} patch tokens do not form a square grid "
                                 "and the backbone does not say its grid")
            grid = (side, side)
        return patches.transpose(1, 2).reshape(b, c, grid[0], grid[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> embeddings (B, embed_dim), not normalised."""
        return self.neck(self.pooled(x))

    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every retrieval embedding from one forward pass, each L2-normalised: `neck`,
        `backbone` (the pooled features) and `both` (the two side by side, whose cosine is the
        mean of the two cosines)."""
        pooled = self.pooled(x)
        out = {"neck": F.normalize(self.neck(pooled).float(), dim=1),
               "backbone": F.normalize(pooled.float(), dim=1)}
        out["both"] = F.normalize(torch.cat([out["neck"], out["backbone"]], dim=1), dim=1)
        return out


class TrainStep(nn.Module):
    """Images and labels -> (neck embeddings, ArcFace logits) in one forward, so
    DistributedDataParallel sees every trained parameter in one call. Without the head
    (`head=False`: a distilled student, or loss.arcface=0) the logits are None."""

    def __init__(self, model: ReIDModel, head: bool = True) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        emb = self.model(images)
        return emb, self.model.head(emb, labels) if self.head else None


def build_head(cfg: Config, n_classes: int, counts: Sequence[int] | None = None) -> ArcFace:
    margins = None
    if cfg.model.dynamic_margin and counts is not None:
        margins = dynamic_margins(counts, cfg.model.arcface_m, cfg.model.arcface_m_min)
    return ArcFace(cfg.model.embed_dim, n_classes, cfg.model.arcface_s, cfg.model.arcface_m,
                   cfg.model.subcenters, margins)


def check_start_weights(cfg: Config) -> None:
    """Training starts from weights, or from noise only when asked to: a forgotten
    `model.weights` would otherwise train a 300M-parameter EVA-02 from random numbers."""
    if not cfg.model.weights and not cfg.model.pretrained and not cfg.model.allow_random_init:
        raise RandomInitError(
            f"model.backbone={cfg.model.backbone!r} has no starting weights: set "
            "model.weights=PATH to a local weights file (.safetensors), model.pretrained=true "
            "to fetch timm's (needs the internet), or model.allow_random_init=true to train it "
            "from random initialisation on purpose")


def build_model(cfg: Config, n_classes: int, counts: Sequence[int] | None = None) -> ReIDModel:
    """The model for training. `counts` (images per class) feeds the dynamic margins."""
    if cfg.model.dynamic_margin and counts is None:
        raise ValueError("model.dynamic_margin needs the image count of every class")
    backbone = create_backbone(cfg)
    if cfg.model.grad_checkpointing and hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)
    return reid_model(cfg, backbone, build_head(cfg, n_classes, counts))


def reid_model(cfg: Config, backbone: nn.Module, head: nn.Module) -> ReIDModel:
    """The network around `backbone` and `head` as `cfg.model` describes it (the one reader of
    those keys, for training and for loading)."""
    m = cfg.model
    return ReIDModel(backbone, m.embed_dim, head, m.gem_p, m.tokens, m.neck_dropout,
                     m.attention, m.glam_reduction)


def load_trained_model(cfg: Config, weights_path: str | Path) -> ReIDModel:
    """A trained fold model from its safetensors file (never unpickles anything)."""
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{weights_path}: unreadable weights file ({exc}); train the fold "
                           "again with train.overwrite=true (it counts as finished)") from None
    if "head.weight" not in state or "head.margins" not in state:
        raise WeightsError(f"{weights_path}: not a model saved by this pipeline (no head "
                           "weights)")
    n_classes = state["head.margins"].shape[0]
    # The saved weights replace the backbone's, so no pretrained file is needed (or read) here.
    arch_cfg = Config({**cfg, "model": Config({**cfg.model, "weights": "", "pretrained": False,
                                               "grad_checkpointing": False})})
    model = reid_model(cfg, create_backbone(arch_cfg), build_head(arch_cfg, n_classes))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes
        raise WeightsError(f"{weights_path}: does not fit model.backbone="
                           f"{cfg.model.backbone!r}: {exc}") from None
    if missing or unexpected:
        raise WeightsError(f"{weights_path}: does not fit model.backbone="
                           f"{cfg.model.backbone!r} (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    return model
