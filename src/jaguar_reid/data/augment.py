"""Image transforms (albumentations): light, seeded training augmentation and the plain
geometry of `data.resize` for evaluation. Both return normalised (3, S, S) float tensors.

Every training draw comes from the seed the sampler hands out with each image, not from a
global or per-worker random state, so an epoch's augmentations are the same whatever the
number of loader workers or GPUs, and a resumed run repeats them exactly.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

# albumentations asks the internet for a newer version at import; this project is offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from jaguar_reid.config import Config  # noqa: E402
from jaguar_reid.data.preprocess import mean_colour, normalisation  # noqa: E402

# Loader workers are the parallelism; OpenCV's own thread pool inside each one only competes.
cv2.setNumThreads(0)


class Transform:
    """`transform(image, seed=None) -> tensor`. `seed` fixes every random draw of this call."""

    def __init__(self, steps: list, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.compose = A.Compose([*steps, A.Normalize(mean=mean, std=std, max_pixel_value=255.0)])

    def __call__(self, image: Image.Image | np.ndarray, seed: int | None = None) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if seed is not None:
            self.compose.set_random_seed(int(seed))
        out = self.compose(image=array)["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def geometry_steps(cfg: Config, size: int) -> list:
    """Any image -> a `size` x `size` square the way `data.resize` says (see
    jaguar_reid.data.preprocess): the evaluation transform, and the training one before its
    random crop. `mask` squares are cut by the loader, so here they are only resized."""
    _, _, interpolation = normalisation(cfg)
    resize = {"interpolation": interpolation, "area_for_downscale": "image"}
    mode = cfg.data.resize
    # auto: the loader already cut a maskless image to its centre square; a masked one is
    # squashed here, exactly as squash does.
    if mode in ("squash", "mask", "auto"):
        return [A.Resize(size, size, **resize)]
    if mode == "letterbox":
        return [A.LongestMaxSize(max_size=size, **resize),
                A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT,
                              fill=tuple(float(v) for v in mean_colour(cfg)))]
    return [A.SmallestMaxSize(max_size=size, **resize), A.CenterCrop(size, size)]


def train_steps(cfg: Config) -> list:
    """The training augmentations, in order. The random resized crop works on the image as
    `data.resize` shapes it (squash: the source itself; letterbox and crop: their square;
    mask: the loader's square). No flip unless `aug.hflip` asks: a mirrored left flank is not
    the right flank of the same animal."""
    aug, size = cfg.aug, cfg.data.img_size
    fill = tuple(float(v) for v in cfg.data.fill)
    jitter = aug.color_jitter
    _, _, interpolation = normalisation(cfg)
    shape = [] if cfg.data.resize in ("squash", "mask", "auto") else geometry_steps(cfg, size)
    return [
        *shape,
        A.RandomResizedCrop(size=(size, size), scale=(aug.crop_scale_min, 1.0),
                            ratio=(0.75, 4 / 3), interpolation=interpolation,
                            area_for_downscale="image"),
        A.Affine(scale=(1 - aug.scale, 1 + aug.scale),
                 translate_percent=(-aug.translate, aug.translate),
                 rotate=(-aug.rotate, aug.rotate), shear=(-aug.shear, aug.shear),
                 border_mode=cv2.BORDER_CONSTANT, fill=fill, p=aug.affine_p),
        A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.0,
                      p=aug.color_p),
        A.GaussianBlur(blur_limit=(3, 7), p=aug.blur_p),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                        hole_width_range=(0.05, 0.15), fill=fill, p=aug.dropout_p),
        A.HorizontalFlip(p=aug.hflip),
    ]


def build_transform(cfg: Config, train: bool) -> Transform:
    """Training: `train_steps`; evaluation: `geometry_steps`. Normalised with the backbone's
    own statistics unless the config names others; the model always sees `img_size` x
    `img_size`."""
    mean, std, _ = normalisation(cfg)
    steps = train_steps(cfg) if train else geometry_steps(cfg, cfg.data.img_size)
    return Transform(steps, mean, std)
