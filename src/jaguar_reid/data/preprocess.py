"""What the backbone expects as input: its normalisation and interpolation (from timm's
pretrained configuration, `data.mean: auto`), and the geometry that turns any image into the
square the model sees (`data.resize`).

A backbone trained on CLIP-normalised images (EVA-02) or on [-1, 1] images (tf_efficientnet)
sees other colours when it is fed ImageNet statistics; a long jaguar crop squashed into a square
changes the rosettes' shapes. Both are measured in docs/experiments.md.
"""

from __future__ import annotations

import cv2
import numpy as np
import timm

from jaguar_reid.config import AUTO, Config
from jaguar_reid.keys import choices

# squash: stretch to the square (timm's own eval for EVA-02); letterbox: fit the long side and
# pad with the mean colour; crop: fit the short side and cut the centre square; mask: a square
# window around the animal's mask, padded where the image ends (the loader cuts it; whole
# images without a mask are letterboxed); auto: per image, squash where it has an alpha mask
# (what won on the masked demo) and crop where it has none (a full frame squashed loses a fifth
# of the score: docs/experiments.md). The loader cuts the maskless ones (`auto_square`).
RESIZE_MODES = choices("data.resize")
# Each mode spelt out for a caller that prepares images without this package (an ONNX model's
# metadata carries its run's). The image is first read with its EXIF orientation applied; the
# resize uses the run's interpolation, area when shrinking.
RESIZE_RULES = {
    "auto": "an image whose alpha channel has some value at or below 127 (a mask): the image "
            "as data.alpha leaves it, resized to img_size x img_size; any other image (every "
            "JPEG): its centre square (side = its short side, offsets rounded down), resized",
    "squash": "the whole image resized to img_size x img_size, proportions not kept",
    "letterbox": "the long side resized to img_size, then padded to a centred square with the "
                 "mean colour",
    "crop": "the short side resized to img_size, then its centre img_size x img_size square",
    "mask": "the square around the alpha mask's box grown by crop_margin (the crop alpha modes "
            "cut that box first), padded with the mean colour where the image ends, resized; "
            "an image without a mask is letterboxed",
}
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST,
                  "lanczos": cv2.INTER_LANCZOS4}
# timm's defaults for a backbone without a pretrained configuration (ImageNet's statistics).
_FALLBACK = {"mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD,
             "interpolation": "bicubic"}


def backbone_input(backbone: str) -> dict:
    """mean, std, interpolation, input size and crop of `backbone` from timm's pretrained
    configuration (known offline: no weights are read); timm's defaults where it has none."""
    pretrained = timm.models.get_pretrained_cfg(backbone) if backbone else None
    if pretrained is None:
        return {**_FALLBACK, "input_size": None, "crop_pct": None, "known": False}
    interpolation = pretrained.interpolation if pretrained.interpolation in INTERPOLATIONS \
        else "bicubic"
    return {"mean": tuple(pretrained.mean), "std": tuple(pretrained.std),
            "interpolation": interpolation, "input_size": tuple(pretrained.input_size),
            "crop_pct": pretrained.crop_pct, "known": True}


def resolve_input(cfg: Config) -> Config:
    """The config with `data.mean`, `data.std` and `data.interpolation` resolved: `auto`
    becomes the backbone's own values; explicit ones stay. Runs save the resolved config, so
    a submission uses what its folds were trained with."""
    wanted = {k: cfg.data[k] for k in ("mean", "std", "interpolation")}
    if all(v != AUTO for v in wanted.values()):
        return cfg
    found = backbone_input(cfg.model.backbone)
    resolved = {k: (list(found[k]) if k != "interpolation" else found[k]) if v == AUTO else v
                for k, v in wanted.items()}
    return Config({**cfg, "data": Config({**cfg.data, **resolved})})


def normalisation(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """(mean, std, OpenCV interpolation flag) of the config, `auto` resolved."""
    data = resolve_input(cfg).data
    return tuple(data.mean), tuple(data.std), INTERPOLATIONS[data.interpolation]


def mean_colour(cfg: Config) -> tuple[int, int, int]:
    """The normalisation mean as an 8-bit RGB colour: padding with it is zero after
    normalisation, as the TTA zoom-out pads."""
    mean, _, _ = normalisation(cfg)
    return tuple(int(round(255 * m)) for m in mean)


def square_window(rgba: np.ndarray, box: tuple[int, int, int, int] | None,
                  pad_rgb: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 4) -> (S, S, 4): the square centred on `box` (top, bottom, left, right; None:
    the whole image) with S its long side; what lies outside the image is `pad_rgb` with
    alpha 0. Nothing is resized: the square is resized later, undistorted."""
    height, width = rgba.shape[:2]
    top, bottom, left, right = box if box is not None else (0, height, 0, width)
    side = max(bottom - top, right - left)
    y0 = (top + bottom - side) // 2
    x0 = (left + right - side) // 2
    out = np.zeros((side, side, 4), dtype=rgba.dtype)
    out[..., :3] = pad_rgb
    ys, ye = max(0, y0), min(height, y0 + side)
    xs, xe = max(0, x0), min(width, x0 + side)
    out[ys - y0:ye - y0, xs - x0:xe - x0] = rgba[ys:ye, xs:xe]
    return out


def centre_square(image: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (S, S, C), S = min(H, W): the centre square, the short side whole (a crop
    at timm's crop_pct 1)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]


def auto_square(image: np.ndarray, has_mask: bool) -> np.ndarray:
    """The loader's part of `data.resize=auto` for one image: a masked image as it is (the
    transform then squashes it, training's random crop included, exactly as `squash`), a
    maskless one cut to its centre square (the transform's resize then keeps its
    proportions, as `crop`)."""
    return image if has_mask else centre_square(image)
