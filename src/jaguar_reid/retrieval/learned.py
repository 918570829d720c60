"""Learned local features: DISK keypoints matched by LightGlue, through kornia.

The learned alternative to `local`'s SIFT + ratio test: `disk_features` turns an image file
into the same `LocalFeatures` (so `local.save_features` / `load_features` cache them), and
`lightglue_match_pair` / `lightglue_inlier_matches` replace the descriptor matching of
`local.match_pair` / `local.inlier_matches` by LightGlue's, then apply the SAME geometric check
(`local._fit` in `local._frame` coordinates, `ransac_threshold` a fraction of the longer side).

Conventions are `local`'s: coordinates in pixels of the ORIGINAL image, centre of the top-left
pixel at (0, 0); descriptors float32 with unit L2 rows (DISK's are 128-d); the pair is put in
`local._canonical` order before matching, so `lightglue_match_pair(a, b) ==
lightglue_match_pair(b, a)` exactly; keypoints are sorted (score, then position), so results
do not depend on threads.

Weights are LOCAL FILES ONLY: nothing here ever downloads (kornia's `from_pretrained` and
`LightGlue(features="disk")` would fetch from the internet; neither is called). Accepted files,
read with `torch.load(..., weights_only=True)`:

* DISK: the file `DISK.from_pretrained` downloads (cvlab-epfl/disk `depth-save.pth` or
  `epipolar-save.pth`: a dict whose "extractor" entry is the state dict), or a plain state dict
  of `kornia.feature.DISK(desc_dim=128)`.
* LightGlue: a plain state dict of LightGlue's "disk" preset (cvg/LightGlue's release file
  `disk_lightglue.pth`, key names `self_attn.{i}...` / `cross_attn.{i}...`, or kornia's own
  `transformers.{i}.self_attn...`).

Loading is strict: a missing or unexpected key, or a wrong shape, is a `LearnedWeightsError`
naming the file. `weights=None` builds randomly initialised models (from `RANDOM_INIT_SEED`):
for tests only, since random weights find and match nothing meaningful; `check_weights`, which
the pipeline calls on its settings, refuses it. kornia is imported inside the functions, so
this module imports without it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from jaguar_reid.extras import require
from jaguar_reid.io_utils import UserInputError
from jaguar_reid.retrieval import local
from jaguar_reid.retrieval.local import LocalFeatures

__all__ = [
    "LearnedWeightsError",
    "WEIGHT_KINDS",
    "check_weights",
    "disk_features",
    "lightglue_inlier_matches",
    "lightglue_match_pair",
    "lightglue_putative_matches",
]

DISK_DIM = 128               # descriptor length of the released DISK models
DISK_WINDOW = 5              # non-maximum suppression window (DISK's and kornia's default)
DISK_SCORE_THRESHOLD = 0.0   # detection logit a keypoint must exceed (same default)
LIGHTGLUE_PRESET = "disk"    # the row of kornia's `LightGlue.features` table used
LIGHTGLUE_THRESHOLD = 0.1    # match confidence a LightGlue match must exceed (its default)
RANDOM_INIT_SEED = 0         # weights=None: the same random model in every call (tests)
# The config key that names each kind of file, for error messages.
WEIGHT_KINDS = {"disk": "local.weights", "lightglue": "local.matcher_weights"}
# Buffers LightGlue computes in its constructor; released files may lack them.
_LIGHTGLUE_DERIVED = frozenset({"confidence_thresholds"})
_EXPECTED = {
    "disk": "a DISK checkpoint ({'extractor': state_dict}, as DISK.from_pretrained downloads) "
            "or a plain state dict of kornia.feature.DISK(desc_dim=128)",
    "lightglue": "a plain state dict of LightGlue's 'disk' preset (disk_lightglue.pth from "
                 "cvg/LightGlue's releases)",
}


class LearnedWeightsError(UserInputError):
    """A DISK or LightGlue weights file that cannot be used; the message names it and says
    what was expected."""


def _kornia_feature() -> ModuleType:
    return require("kornia.feature", "learned local features (local.extractor=disk, "
                   "local.matcher=lightglue)")


def _check_kind(kind: str) -> str:
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"kind must be one of {sorted(WEIGHT_KINDS)}, got {kind!r}")
    return WEIGHT_KINDS[kind]


def check_weights(path: str | Path | None, kind: str) -> Path:
    """The weights file `path` of `kind` ('disk' or 'lightglue') as a resolved Path, checked
    to exist, for validating settings before any work: unset is a `LearnedWeightsError` and a
    missing file a FileNotFoundError, both naming the config key. Nothing is ever downloaded,
    and random weights (None) are refused here: they exist for tests only."""
    key = _check_kind(kind)
    if path is None or not str(path).strip():
        raise LearnedWeightsError(f"{key} is not set: {kind} needs a local weights file "
                                  f"({_EXPECTED[kind]}); nothing is ever downloaded")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}={file}: {kind} weights file not found; expected "
                                f"{_EXPECTED[kind]}. Nothing is ever downloaded: copy the "
                                f"file there, or point {key} at it")
    return file.resolve()


# --------------------------------------------------------------------------- models


def _new_model(kind: str) -> torch.nn.Module:
    kf = _kornia_feature()
    if kind == "disk":
        return kf.DISK(desc_dim=DISK_DIM)
    # features=None: kornia's constructor downloads nothing; the preset's "weights" entry is
    # dropped, else kornia would look for a file inside its own package. Every mutual match
    # comes out (filter_threshold=0): the confidence threshold is applied per call instead.
    conf = {k: v for k, v in kf.LightGlue.features[LIGHTGLUE_PRESET].items() if k != "weights"}
    return kf.LightGlue(features=None, **{**conf, "filter_threshold": 0.0})


def _read_state_dict(path: Path, kind: str, device: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file: name the file
        raise LearnedWeightsError(f"{path}: unreadable {kind} weights (expected "
                                  f"{_EXPECTED[kind]}, loadable with weights_only=True): "
                                  f"{exc}") from exc
    if kind == "disk" and isinstance(obj, Mapping) and "extractor" in obj:
        obj = obj["extractor"]
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise LearnedWeightsError(f"{path}: not {_EXPECTED[kind]}: got a {type(obj).__name__} "
                                  f"that is not a mapping of names to tensors")
    state = dict(obj)
    if kind == "lightglue":
        state = {_kornia_key(k): v for k, v in state.items()}
    return state


def _kornia_key(key: str) -> str:
    """cvg/LightGlue's name of a parameter -> kornia's: `self_attn.{i}.x` ->
    `transformers.{i}.self_attn.x` (the renaming kornia applies to downloaded files)."""
    for block in ("self_attn", "cross_attn"):
        if key.startswith(f"{block}."):
            layer, _, rest = key[len(block) + 1:].partition(".")
            if layer.isdigit():
                return f"transformers.{layer}.{block}.{rest}"
    return key


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                 kind: str) -> None:
    own = model.state_dict()
    optional = _LIGHTGLUE_DERIVED if kind == "lightglue" else frozenset()
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes", shapes)) if items]
    if problems:
        raise LearnedWeightsError(f"{path}: does not fit {kind}; expected {_EXPECTED[kind]}; "
                                  + "; ".join(problems))
    model.load_state_dict(state, strict=False)  # strictness checked above, derived keys aside


@functools.lru_cache(maxsize=8)
def _cached_model(kind: str, path: str | None, stamp: tuple[int, int] | None,
                  device: str) -> torch.nn.Module:
    """One model per (kind, file, file version, device); `stamp` (mtime, size) makes a
    rewritten file load afresh."""
    with torch.random.fork_rng(devices=[]):
        # Random init draws from a fixed seed without touching the caller's generator.
        torch.manual_seed(RANDOM_INIT_SEED)
        model = _new_model(kind)
    if path is not None:
        _load_strict(model, _read_state_dict(Path(path), kind, device), Path(path), kind)
    return model.to(device).eval().requires_grad_(False)


def _model(kind: str, weights: str | Path | None, device: str | torch.device) -> torch.nn.Module:
    device = str(torch.device(device))
    if weights is None:
        return _cached_model(kind, None, None, device)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {kind} weights file not found; expected "
                                f"{_EXPECTED[kind]} (nothing is ever downloaded)")
    path = path.resolve()
    info = path.stat()
    return _cached_model(kind, str(path), (info.st_mtime_ns, info.st_size), device)


# --------------------------------------------------------------------------- DISK


def _empty_features(image_size: tuple[int, int]) -> LocalFeatures:
    return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, DISK_DIM), np.float32),
                         image_size)


def disk_features(path: str | Path, weights: str | Path | None,
                  max_side: int = local.MAX_SIDE, max_keypoints: int = local.MAX_KEYPOINTS, *,
                  max_pixels: int | None = None, mask_erode: int = local.MASK_ERODE,
                  device: str | torch.device = "cpu") -> LocalFeatures:
    """DISK keypoints of one image file, as `LocalFeatures` in the file's own pixels.

    The image is read as `local.image_features` reads it (grayscale, longer side at most
    `max_side`, alpha mask), given to DISK as three equal channels in [0, 1] (zero-padded to a
    multiple of 16 inside kornia), and its `max_keypoints` strongest keypoints kept: with a
    mask, only those inside the mask eroded by `mask_erode` pixels compete for the cap.
    Descriptors: 128-d, unit L2 norm.

    `weights`: a local DISK weights file (see the module's docstring). None = a random model,
    FOR TESTS ONLY: it detects and describes nothing meaningful."""
    if max_keypoints < 1:
        raise ValueError(f"max_keypoints must be >= 1, got {max_keypoints}")
    model = _model("disk", weights, device)  # a bad file fails before any image is read
    gray, mask, original = local._read_working(path, max_side, max_pixels)
    xy, scores, desc = _disk_detect(model, gray)
    if mask is not None and len(xy):
        # Detect everywhere, then drop what lies off the animal, then cap: capping first
        # would spend the budget on the background (as with SIFT, see local.sift_features).
        inside = local.erode_mask(mask, mask_erode)[xy[:, 1], xy[:, 0]] > 0
        xy, scores, desc = xy[inside], scores[inside], desc[inside]
    if not len(xy):
        return _empty_features(original)
    # Strongest first, then by position: a fixed order, so the cap keeps the same points.
    order = np.lexsort((xy[:, 0], xy[:, 1], -scores))[:max_keypoints]
    xy, desc = xy[order].astype(np.float32), local._l2_normalise(desc[order])
    height, width = gray.shape
    # Working pixel centres (i + 0.5) map to original (i + 0.5) * original / working - 0.5.
    scale = np.array([original[1] / width, original[0] / height], dtype=np.float32)
    return LocalFeatures((xy + 0.5) * scale - 0.5, desc, original)


def _disk_detect(model: torch.nn.Module, gray: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every DISK keypoint of a uint8 grayscale image: integer (x, y) working pixels (K, 2),
    detection scores (K,), descriptors (K, D)."""
    device = next(model.parameters()).device
    image = torch.from_numpy(np.ascontiguousarray(gray)).to(device=device, dtype=torch.float32)
    image = (image / 255.0).expand(1, 3, *gray.shape).contiguous()
    with torch.inference_mode():
        # n=None: every local maximum comes back; the cap is applied by the caller, after the
        # mask and with a deterministic tie order (kornia's own cap drops ties at the cut).
        found = model(image, n=None, window_size=DISK_WINDOW,
                      score_threshold=DISK_SCORE_THRESHOLD, pad_if_not_divisible=True)[0]
    return (found.keypoints.long().cpu().numpy(), found.detection_scores.float().cpu().numpy(),
            found.descriptors.float().cpu().numpy())


# --------------------------------------------------------------------------- LightGlue


def _lightglue_side(features: LocalFeatures, name: str, device: torch.device
                    ) -> dict[str, torch.Tensor]:
    height, width = features.image_size
    if features.descriptors.shape[1] != DISK_DIM:
        raise ValueError(f"{name}: LightGlue's '{LIGHTGLUE_PRESET}' model takes {DISK_DIM}-d "
                         f"DISK descriptors, got {features.descriptors.shape[1]}-d")
    # LightGlue normalises by the image's size, so any frame works if keypoints and size
    # agree: the original image's. +0.5 puts the image on [0, W] x [0, H] (its centre then
    # maps to 0; half a pixel is ~1e-3 of the normalised range, far below what matters).
    xy = features.xy + np.float32(0.5)
    if len(xy) and (xy.min() < 0 or np.any(xy > np.array([width, height], np.float32))):
        raise ValueError(f"{name}: keypoints must lie inside the {width}x{height} image "
                         f"(pixel-centre convention), got x, y from {features.xy.min(axis=0)} "
                         f"to {features.xy.max(axis=0)}")
    return {"keypoints": torch.from_numpy(xy)[None].to(device),
            "descriptors": torch.tensor(features.descriptors)[None].to(device),
            "image_size": torch.tensor([[width, height]], dtype=torch.float32, device=device)}


def _check_threshold(match_threshold: float) -> None:
    if not 0 <= match_threshold < 1:
        raise ValueError(f"match_threshold must be in [0, 1) (a match confidence), got "
                         f"{match_threshold}")


def lightglue_putative_matches(a: LocalFeatures, b: LocalFeatures, weights: str | Path | None,
                               *, match_threshold: float = LIGHTGLUE_THRESHOLD,
                               device: str | torch.device = "cpu"
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into a, into b) of LightGlue's mutual matches of confidence above
    `match_threshold` (0.1: LightGlue's own default), most confident first. Order-dependent
    (LightGlue is not exactly symmetric in floating point); `lightglue_inlier_matches` makes
    the pair canonical first. Needs two keypoints on each side (fewer: no matches).
    `weights`: a local file; None = random, for tests only."""
    _check_threshold(match_threshold)
    glue = _model("lightglue", weights, device)
    if min(len(a), len(b)) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    where = next(glue.parameters()).device
    with torch.inference_mode():
        out = glue({"image0": _lightglue_side(a, "a", where),
                    "image1": _lightglue_side(b, "b", where)})
    pairs = out["matches"][0].cpu().numpy().astype(np.int64).reshape(-1, 2)
    scores = out["scores"][0].float().cpu().numpy()
    pairs, scores = pairs[scores > match_threshold], scores[scores > match_threshold]
    order = np.lexsort((pairs[:, 0], -scores))
    return pairs[order, 0], pairs[order, 1]


def lightglue_inlier_matches(a: LocalFeatures, b: LocalFeatures, weights: str | Path | None,
                             min_matches: int = local.MIN_MATCHES,
                             ransac_threshold: float = local.RANSAC_THRESHOLD,
                             method: str = local.METHOD, *, model: str = local.MODEL,
                             match_threshold: float = LIGHTGLUE_THRESHOLD,
                             device: str | torch.device = "cpu",
                             max_iters: int = local.MAX_ITERS,
                             confidence: float = local.CONFIDENCE,
                             seed: int = local.SEED) -> tuple[np.ndarray, np.ndarray]:
    """The geometric inliers among LightGlue's matches, as coordinates ((M, 2) in a's pixels,
    (M, 2) in b's), row t of each the two ends of match t: `local.inlier_matches` with
    LightGlue in place of the ratio test, the same robust fit and threshold. Empty when there
    are fewer than `min_matches` putative matches. Symmetric and deterministic."""
    local._check_match_args(min_matches, method, model, 1.0, ransac_threshold)
    _check_threshold(match_threshold)
    _model("lightglue", weights, device)  # a bad file fails even when no pair is matched
    empty = np.zeros((0, 2), dtype=np.float32)
    if min(len(a), len(b)) < max(min_matches, 2):
        return empty, empty
    first, second = local._canonical(a, b)
    i1, i2 = lightglue_putative_matches(first, second, weights,
                                        match_threshold=match_threshold, device=device)
    if len(i1) < min_matches:
        return empty, empty
    keep = local._fit(local._frame(first, i1), local._frame(second, i2),
                      ransac_threshold * local._FRAME_SIDE, method, model, max_iters,
                      confidence, seed)
    xy1, xy2 = first.xy[i1[keep]], second.xy[i2[keep]]
    return (xy1, xy2) if first is a else (xy2, xy1)


def lightglue_match_pair(a: LocalFeatures, b: LocalFeatures, weights: str | Path | None,
                         min_matches: int = local.MIN_MATCHES,
                         ransac_threshold: float = local.RANSAC_THRESHOLD,
                         method: str = local.METHOD, *, model: str = local.MODEL,
                         match_threshold: float = LIGHTGLUE_THRESHOLD,
                         device: str | torch.device = "cpu", max_iters: int = local.MAX_ITERS,
                         confidence: float = local.CONFIDENCE, seed: int = local.SEED) -> int:
    """Geometric inliers between two images' DISK features matched by LightGlue (see
    `lightglue_inlier_matches`): 0 when fewer than `min_matches` putative matches.
    `lightglue_match_pair(a, b) == lightglue_match_pair(b, a)` exactly."""
    return len(lightglue_inlier_matches(a, b, weights, min_matches, ransac_threshold, method,
                                        model=model, match_threshold=match_threshold,
                                        device=device, max_iters=max_iters,
                                        confidence=confidence, seed=seed)[0])

