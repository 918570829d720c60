"""Synthetic jaguar re-identification data in the Kaggle competition's layout.

`python -m jaguar_reid.demo_data` writes a small, seeded dataset (default `input/demo/`) so the
whole
pipeline can run end to end without the competition data:

    OUT/train/train/train_0001.png ...   RGBA: RGB is the photo, alpha (0/255) the animal mask
    OUT/test/test/test_0001.png ...
    OUT/train.csv              filename,ground_truth
    OUT/test.csv               row_id,query_image,gallery_image (every ordered pair, query-major)
    OUT/sample_submission.csv  row_id,similarity
    OUT/test_labels.csv        filename,ground_truth (not in the competition: for local scoring)

Identities differ only by their coat pattern: every animal has the same silhouette and the same
coat colour family, and each has two independent spot/rosette layouts, one per flank. An image
shows one flank, so the task is solvable only by reading the pattern through pose, crop,
lighting, background, occlusion and blur nuisances.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Canonical animal frame: a side view facing right on a CANVAS_W x CANVAS_H canvas. The flank
# pattern lives in the bounding box of the body ellipse ("body coordinates").
CANVAS_W, CANVAS_H = 256, 128
BODY_CX, BODY_CY, BODY_RX, BODY_RY = 120.0, 62.0, 88.0, 36.0
BODY_X0, BODY_Y0 = int(BODY_CX - BODY_RX), int(BODY_CY - BODY_RY)
PATTERN_W, PATTERN_H = int(2 * BODY_RX), int(2 * BODY_RY)

FLANKS = ("left", "right")
COAT_RGB = np.array([200.0, 146.0, 70.0], dtype=np.float32)  # tawny, shared by every identity
BELLY_RGB = np.array([232.0, 212.0, 170.0], dtype=np.float32)
MARK_RGB = np.array([34.0, 24.0, 18.0], dtype=np.float32)
ROSETTE_CENTRE = 0.28  # darkness of a rosette's inside: slightly darker than the coat

# Sub-seed streams, so that adding a draw to one stream never shifts another.
_STREAM_COUNTS, _STREAM_PATTERN, _STREAM_IMAGE = 1, 2, 3


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


# --------------------------------------------------------------------------------------------
# Coat patterns
# --------------------------------------------------------------------------------------------


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 12):
    """An irregular closed outline: real spots are never circles."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.75, 1.2, n)
    return [(cx + a * math.cos(t), cy + a * math.sin(t) * 0.85)
            for t, a in zip(ang, rad, strict=True)]


def _draw_rosette(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float,
                  r: float, ring: float) -> None:
    outline = _blob_polygon(rng, cx, cy, r, n=int(rng.integers(9, 14)))
    draw.polygon(outline, fill=int(255 * ROSETTE_CENTRE))
    # A broken ring: a few thick dark arcs with gaps, as on a jaguar.
    n_seg = len(outline)
    gaps = set(rng.choice(n_seg, size=int(rng.integers(0, 3)), replace=False).tolist())
    width = max(2, int(round(r * ring * rng.uniform(0.85, 1.15))))
    for i in range(n_seg):
        if i not in gaps:
            draw.line([outline[i], outline[(i + 1) % n_seg]], fill=255, width=width,
                      joint="curve")
    for _ in range(int(rng.integers(0, 3))):  # jaguars' rosettes often hold a dot or two
        dr = r * 0.35 * math.sqrt(rng.random())
        t = rng.uniform(0, 2 * np.pi)
        dot = r * rng.uniform(0.15, 0.25)
        x, y = cx + dr * math.cos(t), cy + dr * math.sin(t)
        draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=255)


def make_coat_style(rng: np.random.Generator) -> dict[str, float]:
    """An individual's marking style, shared by both flanks (as on real jaguars).

    Density, the rosette/spot mix, mark size and ring weight are coat pattern too, and they are
    what a small network picks up first, before it can read the layout itself.
    """
    return {"n_marks": float(rng.integers(15, 25)), "rosette_share": rng.uniform(0.1, 0.95),
            "size": rng.uniform(0.75, 1.3), "ring": rng.uniform(0.25, 0.5)}


def make_flank_pattern(rng: np.random.Generator, style: dict[str, float] | None = None,
                       height: int = PATTERN_H, width: int = PATTERN_W) -> np.ndarray:
    """Darkness map (height, width) float32 in [0, 1] of one flank, in body coordinates.

    0 is bare coat, 1 a black mark, ROSETTE_CENTRE a rosette's inside. Marks are placed inside
    the body ellipse inscribed in the array, without overlap, sized so that ~15-30 of them stay
    readable when the whole animal is only ~40-60 px wide. Without a style, one is drawn.
    """
    if style is None:
        style = make_coat_style(rng)
    ss = 3  # supersampling: marks are drawn large and box-filtered down for soft edges
    n_marks = int(style["n_marks"]) + int(rng.integers(-2, 3))
    scale = width / PATTERN_W * style["size"]
    rosette = rng.random(n_marks) < style["rosette_share"]
    radii = np.where(rosette, rng.uniform(8.0, 14.0, n_marks), rng.uniform(4.0, 7.5, n_marks))
    order = np.argsort(-radii, kind="stable")  # big marks first: they pack, small ones fill in
    img = Image.new("L", (width * ss, height * ss), 0)
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    for i in order.tolist():
        r = float(radii[i]) * scale
        for _ in range(80):
            # Uniform in the ellipse, slightly beyond its rim so marks can wrap out of view.
            rho, t = 0.97 * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            x = width / 2 + rho * math.cos(t) * width / 2
            y = height / 2 + rho * math.sin(t) * height / 2
            if all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + 3.0 * scale) ** 2
                   for px, py, pr in placed):
                break
        else:
            continue  # no room left for a mark this size
        placed.append((x, y, r))
        if rosette[i]:
            _draw_rosette(draw, rng, x * ss, y * ss, r * ss, style["ring"])
        else:
            draw.polygon(_blob_polygon(rng, x * ss, y * ss, r * ss, n=10), fill=255)
    small = img.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def make_identity_patterns(seed: int, identity: int) -> dict[str, np.ndarray]:
    """The two flank patterns of one individual: independent layouts in one shared style."""
    style = make_coat_style(_rng(seed, _STREAM_PATTERN, identity))
    return {flank: make_flank_pattern(_rng(seed, _STREAM_PATTERN, identity, k), style)
            for k, flank in enumerate(FLANKS)}


# --------------------------------------------------------------------------------------------
# The animal on its canonical canvas
# --------------------------------------------------------------------------------------------

_CONSTANTS: dict[str, np.ndarray] = {}


def _canvas_constants() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(body ellipse mask, belly weight, body rim shading) on the canvas, built once."""
    if not _CONSTANTS:
        yy, xx = np.mgrid[0:CANVAS_H, 0:CANVAS_W].astype(np.float32) + 0.5
        dy = (yy - BODY_CY) / BODY_RY
        _CONSTANTS["body"] = ((xx - BODY_CX) / BODY_RX) ** 2 + dy**2 <= 1.0
        # The underside fades to cream, as on a real cat.
        _CONSTANTS["belly"] = np.clip((dy - 0.35) / 0.6, 0, 1) * 0.8
        # Darker towards back and belly, so the flat body reads as a volume.
        _CONSTANTS["rim"] = 1.0 - 0.18 * np.clip(np.abs(dy), 0, 1) ** 2
    return _CONSTANTS["body"], _CONSTANTS["belly"], _CONSTANTS["rim"]


def _draw_silhouette(rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Per-image pose of legs, tail and head around the fixed body: (label map, shade map).

    Labels: 0 outside, 1 limbs/tail/head (plain coat), 2 body (flank pattern).
    """
    labels = Image.new("L", (CANVAS_W, CANVAS_H), 0)
    shade = Image.new("L", (CANVAS_W, CANVAS_H), 255)
    dl, ds = ImageDraw.Draw(labels), ImageDraw.Draw(shade)
    ground = CANVAS_H - 3
    # (hip or shoulder x, near side?): each far leg first, so its near twin overlaps it.
    legs = [(52, False), (70, True), (170, False), (186, True)]
    for x_top, near in legs:
        ang = math.radians(rng.uniform(-18, 18))
        y_top = BODY_CY + 0.4 * BODY_RY
        length = ground - y_top
        knee = (x_top + 0.5 * length * math.sin(ang) + rng.uniform(-4, 4), y_top + 0.5 * length)
        foot = (x_top + length * math.sin(ang), ground - rng.uniform(0, 6))
        w = 15 if near else 12
        pts = [(x_top, y_top), knee, foot]
        dl.line(pts, fill=1, width=w, joint="curve")
        ds.line(pts, fill=255 if near else 190, width=w, joint="curve")
        dl.ellipse([foot[0] - w * 0.6, foot[1] - w * 0.45, foot[0] + w * 0.6, foot[1] + w * 0.3],
                   fill=1)
    # Tail: a thick, slightly random curve from the rump.
    t0 = (BODY_CX - BODY_RX + 6, BODY_CY - 10)
    bend = rng.uniform(-1, 1)
    tail = [t0, (t0[0] - 14, t0[1] + 14 + 6 * bend), (t0[0] - 22, t0[1] + 36 + 8 * bend),
            (t0[0] - 20 + 10 * bend, t0[1] + 54)]
    dl.line(tail, fill=1, width=9, joint="curve")
    dl.ellipse([BODY_CX - BODY_RX, BODY_CY - BODY_RY, BODY_CX + BODY_RX, BODY_CY + BODY_RY],
               fill=2)
    # Neck and head, raised or lowered a little per image.
    hy = 40 + rng.uniform(-7, 7)
    hx = 228 + rng.uniform(-3, 3)
    dl.polygon([(186, BODY_CY - 26), (hx - 8, hy - 14), (hx + 4, hy + 14), (196, BODY_CY + 10)],
               fill=1)
    dl.ellipse([hx - 22, hy - 17, hx + 21, hy + 16], fill=1)
    dl.ellipse([hx + 8, hy - 4, hx + 27, hy + 12], fill=1)  # muzzle
    for ex in (hx - 14, hx - 2):  # ears
        dl.ellipse([ex - 6, hy - 22, ex + 6, hy - 10], fill=1)
    ds.ellipse([hx + 5, hy - 8, hx + 9, hy - 4], fill=40)  # eye
    ds.ellipse([hx + 22, hy + 1, hx + 28, hy + 6], fill=70)  # nose
    return labels, shade


def _nuisance_spots(rng: np.random.Generator) -> np.ndarray:
    """Small random spots for head, legs and tail: present, but never identity-bearing."""
    img = Image.new("L", (CANVAS_W, CANVAS_H), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(25, 45))):
        x, y = rng.uniform(0, CANVAS_W), rng.uniform(0, CANVAS_H)
        r = rng.uniform(1.2, 3.0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=230)
    return np.asarray(img, dtype=np.float32) / 255.0


def render_animal(rng: np.random.Generator, pattern: np.ndarray) -> Image.Image:
    """The animal facing right on its canonical canvas as RGBA (alpha = silhouette)."""
    body, belly, rim = _canvas_constants()
    labels_img, shade_img = _draw_silhouette(rng)
    labels = np.asarray(labels_img)
    on_body = (labels == 2) & body
    shade = np.asarray(shade_img, dtype=np.float32) / 255.0 * np.where(on_body, rim, 1.0)
    flank = np.zeros((CANVAS_H, CANVAS_W), np.float32)
    flank[BODY_Y0:BODY_Y0 + PATTERN_H, BODY_X0:BODY_X0 + PATTERN_W] = pattern
    dark = np.where(on_body, flank, _nuisance_spots(rng))
    # Per-image coat colour: jitter large enough that colour cannot carry identity.
    coat = COAT_RGB * rng.normal(1.0, 0.07, 3).astype(np.float32) * rng.uniform(0.85, 1.1)
    lowfreq = rng.normal(0, 1, (4, 8)).astype(np.float32)
    mottling = np.asarray(Image.fromarray(lowfreq).resize(
        (CANVAS_W, CANVAS_H), Image.Resampling.BICUBIC), dtype=np.float32)
    cream = np.where(on_body, belly, 0.3 * belly)[..., None]
    base = (coat * (1 - cream) + BELLY_RGB * cream) * (1 + 0.05 * mottling[..., None])
    rgb = (base * (1 - dark[..., None]) + MARK_RGB * dark[..., None]) * shade[..., None]
    alpha = np.where(labels > 0, 255, 0).astype(np.uint8)
    rgba = np.dstack([np.clip(rgb, 0, 255).astype(np.uint8), alpha])
    return Image.fromarray(rgba)


# --------------------------------------------------------------------------------------------
# Scene: background, pose, occlusion, camera
# --------------------------------------------------------------------------------------------

_FOLIAGE = np.array([[58, 92, 40], [88, 120, 52], [34, 62, 30], [110, 98, 60], [92, 72, 48],
                     [140, 128, 90], [70, 80, 60], [150, 150, 120], [46, 50, 38]], np.float32)


def _foliage_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    c = _FOLIAGE[rng.integers(len(_FOLIAGE))] * rng.uniform(0.7, 1.3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def make_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Gradient + blurred foliage blobs and stalks: varied, but rarely spot-like.

    Blobs are pulled towards the gradient's colour: cluttered, high-contrast backgrounds cost
    a small network far more of its few training images than they add realism.
    """
    c0 = np.array(_foliage_colour(rng), np.float32)
    c1 = np.array(_foliage_colour(rng), np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * math.cos(ang) + yy * math.sin(ang)) / max(width, height)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    unit = max(width, height) / 192.0
    mid = (c0 + c1) / 2
    clutter = rng.uniform(0.3, 0.9)

    def muted() -> tuple[int, int, int]:
        c = mid + clutter * (np.array(_foliage_colour(rng), np.float32) - mid)
        return tuple(int(v) for v in np.clip(c, 0, 255))

    # Blobs mostly larger than a spot, and blurred: foliage, not a second coat.
    for _ in range(int(rng.integers(4, 16))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(12, 60) * unit, rng.uniform(8, 35) * unit
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=muted())
    for _ in range(int(rng.integers(0, 10))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        a, n = rng.uniform(0, np.pi), rng.uniform(20, 120) * unit
        draw.line([x, y, x + n * math.cos(a), y + n * math.sin(a)], fill=muted(),
                  width=max(1, int(rng.uniform(1, 5) * unit)))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 5.0) * unit))


def _draw_occluders(rng: np.random.Generator, width: int, height: int,
                    near: tuple[float, float]) -> Image.Image:
    """Branches and leaf clusters in front of the animal (RGBA, alpha = occluder)."""
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    unit = max(width, height) / 192.0
    for _ in range(int(rng.integers(1, 3))):
        cx = near[0] + rng.normal(0, 0.2) * width
        cy = near[1] + rng.normal(0, 0.2) * height
        if rng.random() < 0.5:  # a branch across the frame
            a = rng.uniform(0, np.pi)
            n = max(width, height)
            pts = [(cx + s * n * math.cos(a) + rng.normal(0, 4 * unit),
                    cy + s * n * math.sin(a) + rng.normal(0, 4 * unit))
                   for s in np.linspace(-0.8, 0.8, 5)]
            colour = _foliage_colour(rng)
            draw.line(pts, fill=(*colour, 255), width=max(2, int(rng.uniform(3, 9) * unit)),
                      joint="curve")
        else:  # a leaf cluster
            for _ in range(int(rng.integers(3, 8))):
                x, y = cx + rng.normal(0, 12 * unit), cy + rng.normal(0, 10 * unit)
                rx, ry = rng.uniform(4, 12) * unit, rng.uniform(2, 6) * unit
                draw.ellipse([x - rx, y - ry, x + rx, y + ry],
                             fill=(*_foliage_colour(rng), 255))
    return layer


def _pose_matrix(rng: np.random.Generator, facing_left: bool) -> np.ndarray:
    """2x2 canvas->image linear map at unit scale: mirror, aspect, shear, rotation."""
    # Mostly near level, as most camera-trap and phone shots are; never beyond +-25 degrees.
    theta = math.radians(float(np.clip(rng.normal(0, 10), -25, 25)))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    shear = np.array([[1.0, rng.uniform(-0.12, 0.12)], [0.0, 1.0]])
    aspect = rng.uniform(0.88, 1.12)
    flip = np.diag([-aspect if facing_left else aspect, 1.0])
    return rot @ shear @ flip


def _light(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Camera and light: brightness, contrast, colour temperature and a shading ramp."""
    h, w = rgb.shape[:2]
    mean = rgb.mean()
    out = (rgb - mean) * rng.uniform(0.75, 1.2) + mean
    out = out * rng.uniform(0.7, 1.2)
    warm = rng.uniform(-0.12, 0.12)
    out = out * np.array([1 + warm, 1.0, 1 - warm], np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx - w / 2) * math.cos(ang) + (yy - h / 2) * math.sin(ang)) / max(w, h)
    out = out * (1 + rng.uniform(0, 0.5) * ramp)[..., None]
    return out


def render_image(rng: np.random.Generator, pattern: np.ndarray, flank: str, width: int,
                 height: int) -> np.ndarray:
    """One photo of a flank: (height, width, 4) uint8, alpha 255 on visible animal pixels.

    A left flank is seen with the head on the left, a right flank with the head on the right.
    """
    if flank not in FLANKS:
        raise ValueError(f"flank must be one of {FLANKS}, got {flank!r}")
    animal = render_animal(rng, pattern)
    alpha = np.asarray(animal.getchannel("A"))
    ys, xs = np.nonzero(alpha)
    box = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1],
                    [xs.max() + 1, ys.max() + 1]], np.float64)
    centre = box.mean(axis=0)
    lin = _pose_matrix(rng, facing_left=flank == "left")
    corners = (box - centre) @ lin.T
    span = corners.max(axis=0) - corners.min(axis=0)
    # Scale so the animal spans 55-85% of the width, unless the height limits it first.
    scale = min(rng.uniform(0.55, 0.85) * width / span[0],
                rng.uniform(0.85, 1.05) * height / span[1])
    span = span * scale
    # Shrink with an antialiasing resize first; the affine warp then only rotates and shears.
    pre = min(1.0, scale)
    small = animal.resize((max(1, round(CANVAS_W * pre)), max(1, round(CANVAS_H * pre))),
                          Image.Resampling.BILINEAR, reducing_gap=2.0)
    fwd = lin * (scale / pre)
    inv = np.linalg.inv(fwd)
    frame = np.array([width, height], np.float64)
    full_area = np.count_nonzero(alpha) * abs(np.linalg.det(lin)) * scale**2
    for _attempt in range(6):
        # Mostly inside the frame; sometimes pushed over one border to crop part of the animal,
        # but a placement that hides more than a third of it is drawn again.
        slack = np.zeros(2)
        if rng.random() < 0.3:
            slack[rng.integers(2)] = rng.uniform(0.05, 0.25)
        slack = slack * span
        lo = np.minimum(span / 2 - slack, frame / 2)
        hi = np.maximum(frame - span / 2 + slack, frame / 2)
        pos = rng.uniform(lo, hi) if _attempt < 5 else frame / 2
        # PIL's AFFINE maps each output pixel to its source: src = inv @ (dst - pos) + centre.
        offset = centre * pre - inv @ pos
        coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
        warped = small.transform((width, height), Image.Transform.AFFINE, coeffs,
                                 resample=Image.Resampling.BILINEAR)
        if np.count_nonzero(np.asarray(warped.getchannel("A")) >= 128) >= 0.67 * full_area:
            break
    return _photograph(rng, warped, tuple(pos), width, height)


def _photograph(rng: np.random.Generator, warped: Image.Image, pos: tuple, width: int,
                height: int) -> np.ndarray:
    """The placed animal on a background, maybe partly hidden, lit, blurred and noisy: the
    RGBA photo, alpha 255 where the animal is visible."""
    warped_np = np.asarray(warped, dtype=np.float32)
    soft = warped_np[..., 3:4] / 255.0
    photo = np.asarray(make_background(rng, width, height), dtype=np.float32)
    photo = photo * (1 - soft) + warped_np[..., :3] * soft
    mask = warped_np[..., 3] >= 128
    if rng.random() < 0.3:
        occ = np.asarray(_draw_occluders(rng, width, height, pos), dtype=np.float32)
        occ_a = occ[..., 3:4] / 255.0
        photo = photo * (1 - occ_a) + occ[..., :3] * occ_a
        mask &= occ[..., 3] < 128
    photo = _light(rng, photo)
    img = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * max(width, height)
                                                  / 192.0))
    out = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.3:
        out = out + rng.normal(0, rng.uniform(2, 8), out.shape).astype(np.float32)
    rgb = np.clip(out, 0, 255).astype(np.uint8)
    return np.dstack([rgb, np.where(mask, 255, 0).astype(np.uint8)])


# --------------------------------------------------------------------------------------------
# Dataset plan and files
# --------------------------------------------------------------------------------------------


def draw_image_counts(rng: np.random.Generator, n_ids: int, min_images: int,
                      max_images: int) -> np.ndarray:
    """Per-identity image totals between min and max, unequal like the real jaguars' counts.

    Drawn in log space, where plain uniform draws would leave most individuals near the
    minimum; the exponent 0.38 lifts the bulk (median ~25 of 6..40, ~500 train images at the
    defaults) and keeps a tail of rarely seen ones. Stratified draws keep the total stable
    across seeds.
    """
    strata = (rng.permutation(n_ids) + rng.random(n_ids)) / n_ids
    t = strata ** 0.38
    counts = np.round(min_images * (max_images / min_images) ** t).astype(int)
    return np.clip(counts, min_images, max_images)


def plan_dataset(seed: int, n_ids: int, min_images: int, max_images: int,
                 test_fraction: float) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(identity, flank) per train and per test image, each list shuffled across identities."""
    rng = _rng(seed, _STREAM_COUNTS)
    counts = draw_image_counts(rng, n_ids, min_images, max_images)
    train: list[tuple[int, str]] = []
    test: list[tuple[int, str]] = []
    for ident, n in enumerate(counts.tolist()):
        n_test = min(max(1, round(test_fraction * n)), n - 4)
        n_train = n - n_test
        # Train holds both flanks at least twice, so every test image's flank was seen.
        p_left = rng.uniform(0.3, 0.7)
        n_left = int(np.clip(rng.binomial(n_train, p_left), 2, n_train - 2))
        train_flanks = ["left"] * n_left + ["right"] * (n_train - n_left)
        test_flanks = ["left" if rng.random() < p_left else "right" for _ in range(n_test)]
        train += [(ident, f) for f in train_flanks]
        test += [(ident, f) for f in test_flanks]
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    return train, test


def _write_csv(path: Path, header: list[str], rows: Iterable[Sequence[object]]) -> None:
    """Atomically: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _image_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    return long_side, max(8, round(long_side / rng.uniform(1.2, 2.0)))


def generate_demo_dataset(out_dir: str | Path, *, seed: int = 0, n_ids: int = 24,
                          min_images: int = 6, max_images: int = 40, test_fraction: float = 0.2,
                          image_size: int = 192, overwrite: bool = False) -> dict:
    """Write the synthetic dataset into out_dir; return n_ids, n_train, n_test, n_pairs, out_dir.

    Refuses (FileExistsError) when out_dir already holds a train.csv, unless overwrite. train.csv
    is written last, so its presence marks a complete dataset.
    """
    if n_ids < 2:
        raise ValueError("n_ids must be >= 2 (test pairs need two test images)")
    if min_images < 5:
        raise ValueError("min_images must be >= 5 (4 train images + 1 test image per identity)")
    if max_images < min_images:
        raise ValueError("max_images must be >= min_images")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must be in [0, 1)")
    if image_size < 16:
        raise ValueError("image_size must be >= 16")
    out = Path(out_dir)
    if (out / "train.csv").exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} already contains train.csv; pass overwrite=True (--overwrite) to replace")
        # The marker goes first: an interrupted rewrite must not look like a complete dataset.
        (out / "train.csv").unlink()
        for sub in ("train", "test"):
            shutil.rmtree(out / sub, ignore_errors=True)
    train_dir, test_dir = out / "train" / "train", out / "test" / "test"
    train_dir.mkdir(parents=True, exist_ok=True)
    test_dir.mkdir(parents=True, exist_ok=True)

    train_plan, test_plan = plan_dataset(seed, n_ids, min_images, max_images, test_fraction)
    patterns = [make_identity_patterns(seed, i) for i in range(n_ids)]
    name_width = max(2, len(str(n_ids - 1)))
    names = [f"ind_{i:0{name_width}d}" for i in range(n_ids)]

    def write_split(split: str, split_id: int, plan, folder: Path) -> list[tuple[str, str]]:
        digits = max(4, len(str(len(plan))))
        rows = []
        for k, (ident, flank) in enumerate(plan):
            rng = _rng(seed, _STREAM_IMAGE, split_id, k)
            w, h = _image_size(rng, image_size)
            arr = render_image(rng, patterns[ident][flank], flank, w, h)
            fname = f"{split}_{k + 1:0{digits}d}.png"
            Image.fromarray(arr).save(folder / fname, compress_level=3)
            rows.append((fname, names[ident]))
        return rows

    train_rows = write_split("train", 0, train_plan, train_dir)
    test_rows = write_split("test", 1, test_plan, test_dir)
    test_files = [f for f, _ in test_rows]
    pairs = [(q, g) for q in test_files for g in test_files if q != g]
    _write_csv(out / "test_labels.csv", ["filename", "ground_truth"], test_rows)
    _write_csv(out / "test.csv", ["row_id", "query_image", "gallery_image"],
               ((i, q, g) for i, (q, g) in enumerate(pairs)))
    _write_csv(out / "sample_submission.csv", ["row_id", "similarity"],
               ((i, 0.5) for i in range(len(pairs))))
    _write_csv(out / "train.csv", ["filename", "ground_truth"], train_rows)
    return {"n_ids": n_ids, "n_train": len(train_rows), "n_test": len(test_rows),
            "n_pairs": len(pairs), "out_dir": str(out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaguar_reid.demo_data",
        description="Generate a synthetic jaguar re-ID dataset in the Kaggle layout.")
    parser.add_argument("--out", default="input/demo", help="output folder (default input/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ids", type=int, default=24, help="number of individuals")
    parser.add_argument("--min-images", type=int, default=6, help="fewest images per individual")
    parser.add_argument("--max-images", type=int, default=40, help="most images per individual")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of each individual's images in the test set (at least 1)")
    parser.add_argument("--image-size", type=int, default=192, help="long side in pixels")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset in --out")
    parser.add_argument("--if-missing", action="store_true",
                        help="keep an existing dataset in --out and do nothing (for scripts)")
    args = parser.parse_args(argv)
    if args.if_missing and not args.overwrite and (Path(args.out) / "train.csv").is_file():
        print(f"demo data: keeping the dataset already in {args.out} (--overwrite replaces it)")
        return
    t0 = time.perf_counter()
    try:
        summary = generate_demo_dataset(
            args.out, seed=args.seed, n_ids=args.ids, min_images=args.min_images,
            max_images=args.max_images, test_fraction=args.test_fraction,
            image_size=args.image_size, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(f"demo data: {summary['n_ids']} identities, {summary['n_train']} train images, "
          f"{summary['n_test']} test images, {summary['n_pairs']} pairs -> {summary['out_dir']} "
          f"({time.perf_counter() - t0:.1f}s)")
