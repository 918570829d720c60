"""Local-feature verification: keypoint matching re-checks a shortlist of image pairs.

A global embedding gives a similarity for every pair of test images; a jaguar, though, is told
apart by the exact shape and layout of its rosettes, which local keypoints capture. This module
re-checks only the top-B gallery images of each query (`shortlist_pairs`): SIFT keypoints on a
grayscale copy of each image (`read_for_features`, `sift_features`), descriptors matched by
mutual nearest neighbours with Lowe's ratio test, and the matches checked for one consistent
geometry with a robust estimator (`match_pair`). The number of geometric inliers of each pair
(`verify_pairs`) is the evidence a later step fuses with the global similarity
(`inlier_matrix`, `dense_inliers`). The cost grows as N x B pairs, not N^2.

Conventions shared by every function:

* **Coordinates**: `LocalFeatures.xy` is (x, y) in pixels of the ORIGINAL image (the file as
  read, before any resize), pixel-centre convention: the centre of the top-left pixel is
  (0, 0). Features computed at any working size therefore describe the same physical points,
  and keypoints can be drawn on the original image. `image_size` is that image's (height,
  width).
* **Geometric threshold**: `ransac_threshold` is a fraction of each image's longer side, so it
  means the same at every working size and for images of any size (0.02 = 10 px at 512 px).
* **Descriptors**: float32 with unit L2 norm: RootSIFT by default (L1-normalise, then square
  root; the Euclidean distance of RootSIFT is the Hellinger distance of the SIFT histograms),
  else plain SIFT L2-normalised. The squared distance of two descriptors is 2 - 2 a.b.
* **Symmetry**: `match_pair(a, b) == match_pair(b, a)` exactly: the pair is put in a canonical
  order (by content) before anything order-dependent happens. Pairs are unordered everywhere;
  the cache of `verify_pairs` is keyed by (min, max) index.
* **Determinism**: SIFT keypoints are sorted (response, then position) and the robust
  estimators run with a fixed seed, so the same inputs give the same counts in any thread.

Every knob is a plain function argument whose default is one of the module constants below.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import sparse

from jaguar_reid.data.images import read_rgba
from jaguar_reid.io_utils import UserInputError, atomic_path

__all__ = [
    "GEOMETRIC_MODELS",
    "MATCH_METHODS",
    "FeatureFileError",
    "LocalFeatures",
    "dense_inliers",
    "erode_mask",
    "image_features",
    "inlier_matrix",
    "load_features",
    "match_pair",
    "putative_matches",
    "read_for_features",
    "root_sift",
    "save_features",
    "shortlist_pairs",
    "sift_features",
    "verify_pairs",
]

# --------------------------------------------------------------------------- defaults
# Every default in one place; the config layer (local.*) overrides them through arguments.

MAX_SIDE = 512            # working size: longer side in pixels (never upscaled)
MAX_KEYPOINTS = 512       # SIFT keypoints kept per image, strongest first
CONTRAST_THRESHOLD = 0.04  # OpenCV's SIFT default; lower finds more keypoints in flat images
MASK_ERODE = 5            # pixels (at the working size) the alpha mask is eroded by
ROOT_SIFT = True
RATIO = 0.8               # Lowe's ratio test on descriptor distances
MUTUAL = True             # keep a match only when each keypoint is the other's best
MIN_MATCHES = 8           # fewer putative matches than this: 0 inliers, no geometry is fitted
RANSAC_THRESHOLD = 0.02   # fraction of the image's longer side (10 px at 512 px)
METHOD = "magsac"
MODEL = "homography"
MAX_ITERS = 2000
CONFIDENCE = 0.999
SEED = 0
SHORTLIST_BLOCK = 1024    # rows of similarities sorted at a time by `shortlist_pairs`

MATCH_METHODS = {"magsac": cv2.USAC_MAGSAC, "ransac": cv2.RANSAC}
# The geometric model, and the fewest matches that determine it.
# * homography (default): a point-to-point constraint, so a chance match is rarely an inlier.
#   A jaguar's flank is neither planar nor rigid, but the part two photos share is close to a
#   plane seen in perspective, and a loose threshold (2% of the side) absorbs the rest: on
#   synthetic spot images bent by a smooth displacement of 4% of the side, 2% keeps ~1.25x the
#   inliers 1% keeps (4%: ~1.5x) while unrelated images gain at most one chance inlier. Real
#   unrelated photos have more near-miss matches, hence not looser by default. Spatial
#   verification in animal re-identification (HotSpotter, WildFusion) uses such checks.
# * affine: fewer degrees of freedom, for near-orthographic views.
# * fundamental: any rigid 3-D shape, but its constraint is point-to-LINE, so unrelated images
#   keep more chance inliers (7-8 where a homography keeps 4, on synthetic spots).
GEOMETRIC_MODELS = {"homography": 4, "affine": 3, "fundamental": 8}
# Coordinates are scaled so each image's longer side is this many units before the robust
# fit: pixel-like magnitudes, for which OpenCV's estimators and their tolerances are written.
_FRAME_SIDE = 1000.0
FEATURE_FILE_VERSION = 1


# --------------------------------------------------------------------------- features


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """Keypoints of one image. xy: (K, 2) float32 (x, y) in pixels of the original image,
    pixel-centre convention; descriptors: (K, D) float32, unit L2 rows; image_size: the
    original image's (height, width). K = 0 is valid."""

    xy: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        xy = np.ascontiguousarray(self.xy, dtype=np.float32).reshape(-1, 2)
        desc = np.ascontiguousarray(self.descriptors, dtype=np.float32)
        if desc.ndim != 2 or len(desc) != len(xy):
            raise ValueError(f"LocalFeatures: descriptors must be (K, D) with K = {len(xy)} "
                             f"keypoints, got shape {desc.shape}")
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"LocalFeatures: image_size must be (height, width) >= 1, "
                             f"got {self.image_size}")
        object.__setattr__(self, "xy", xy)
        object.__setattr__(self, "descriptors", desc)
        object.__setattr__(self, "image_size", size)

    def __len__(self) -> int:
        return len(self.xy)


def _working_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _read_working(path: str | Path, max_side: int, max_pixels: int | None
                  ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """`read_for_features` plus the original image's (height, width)."""
    if max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    rgba = read_rgba(path, max_pixels)
    gray = cv2.cvtColor(np.ascontiguousarray(rgba[..., :3]), cv2.COLOR_RGB2GRAY)
    alpha = rgba[..., 3]
    original = gray.shape
    size = _working_size(*original, max_side)
    if size != original:
        gray = cv2.resize(gray, size[::-1], interpolation=cv2.INTER_AREA)
    if alpha.min() == 255:
        return gray, None, original
    if size != original:
        alpha = cv2.resize(np.ascontiguousarray(alpha), size[::-1],
                           interpolation=cv2.INTER_AREA)
    return gray, np.where(alpha > 127, 255, 0).astype(np.uint8), original


def read_for_features(path: str | Path, max_side: int = MAX_SIDE,
                      max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """An image file as (gray uint8 (h, w), mask uint8 (h, w) or None) at the working size:
    longer side at most `max_side` (INTER_AREA, never upscaled). The file is decoded as every
    reader decodes it (`images.decode_image`: upright by its EXIF orientation, so keypoints,
    mask and embeddings see the same pixels; an empty mask is the whole image). The mask is
    255 where alpha > 127 and 0 elsewhere, or None when no pixel's alpha is below 255.
    Unusable files raise `DataError` naming them (`max_pixels`: the source checks)."""
    gray, mask, _ = _read_working(path, max_side, max_pixels)
    return gray, mask


def root_sift(descriptors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """RootSIFT (Arandjelovic and Zisserman 2012): L1-normalise each non-negative row, then
    take the square root; rows come out with unit L2 norm (all-zero rows stay zero)."""
    desc = np.asarray(descriptors, dtype=np.float32)
    l1 = np.abs(desc).sum(axis=1, keepdims=True)
    return np.sqrt(np.abs(desc) / np.maximum(l1, eps)).astype(np.float32)


def _l2_normalise(descriptors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(descriptors, axis=1, keepdims=True)
    return (descriptors / np.maximum(norm, eps)).astype(np.float32)


def erode_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` shrunk by `pixels` (a disc): keypoints on the silhouette's edge describe the
    background as much as the animal."""
    if pixels <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    # Outside the image counts as inside the mask: only the silhouette's edge is eroded.
    return cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=255)


def sift_features(gray: np.ndarray, mask: np.ndarray | None = None,
                  max_keypoints: int = MAX_KEYPOINTS, *,
                  image_size: tuple[int, int] | None = None,
                  mask_erode: int = MASK_ERODE, root: bool = ROOT_SIFT,
                  contrast_threshold: float = CONTRAST_THRESHOLD) -> LocalFeatures:
    """SIFT keypoints of a uint8 grayscale image (the working copy), at most `max_keypoints`,
    strongest first. Detection is restricted to `mask` (non-zero = animal) eroded by
    `mask_erode` pixels. `image_size` is the ORIGINAL image's (height, width) the working copy
    was resized from (default: the working size, i.e. not resized); coordinates are returned in
    that image's pixels (see the module's conventions)."""
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"gray must be a (H, W) uint8 image, got {gray.dtype} {gray.shape}")
    if max_keypoints < 1:
        raise ValueError(f"max_keypoints must be >= 1, got {max_keypoints}")
    height, width = gray.shape
    original = (height, width) if image_size is None else tuple(int(v) for v in image_size)
    detect_mask = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != gray.shape:
            raise ValueError(f"mask must have the image's shape {gray.shape}, got {mask.shape}")
        detect_mask = erode_mask(np.where(mask > 0, 255, 0).astype(np.uint8), mask_erode)
    # OpenCV keeps its `nfeatures` strongest keypoints BEFORE it applies the mask, so with a
    # mask the cap would be spent on the background (141 of 256 kept on a measured RGBA
    # image): then every keypoint is detected and the strongest are kept below.
    # Precise upscaling: OpenCV's default doubles the image for its first octave with a
    # half-pixel shift and reports every keypoint 0.25 px off (right and down); measured.
    sift = cv2.SIFT_create(nfeatures=max_keypoints if detect_mask is None else 0,
                           contrastThreshold=contrast_threshold, enable_precise_upscale=True)
    keypoints, desc = sift.detectAndCompute(gray, detect_mask)
    if not keypoints or desc is None:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32),
                             original)
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float32)
    response = np.array([kp.response for kp in keypoints], dtype=np.float32)
    # The cap, and a fixed order (strongest first, then by position) that makes the result
    # independent of threading; OpenCV's own cap keeps every tie at the cut.
    order = np.lexsort((xy[:, 0], xy[:, 1], -response))[:max_keypoints]
    xy, desc = xy[order], desc[order]
    desc = root_sift(desc) if root else _l2_normalise(desc)
    # Working pixel centres (i + 0.5) map to original (i + 0.5) * original / working - 0.5.
    scale = np.array([original[1] / width, original[0] / height], dtype=np.float32)
    return LocalFeatures((xy + 0.5) * scale - 0.5, desc, original)


def image_features(path: str | Path, max_side: int = MAX_SIDE,
                   max_keypoints: int = MAX_KEYPOINTS, *, max_pixels: int | None = None,
                   mask_erode: int = MASK_ERODE, root: bool = ROOT_SIFT,
                   contrast_threshold: float = CONTRAST_THRESHOLD) -> LocalFeatures:
    """One image file's local features: `read_for_features` then `sift_features`, with
    coordinates in the file's own pixels."""
    gray, mask, original = _read_working(path, max_side, max_pixels)
    return sift_features(gray, mask, max_keypoints, image_size=original,
                         mask_erode=mask_erode, root=root,
                         contrast_threshold=contrast_threshold)


# --------------------------------------------------------------------------- feature files


class FeatureFileError(UserInputError):
    """A local-feature file that cannot be used (corrupt, or not written by `save_features`);
    the message names it and says what was expected. Deleting it makes it be recomputed."""


_FILE_KEYS = ("version", "xy", "descriptors", "offsets", "image_sizes")


def save_features(path: str | Path, features: Sequence[LocalFeatures]) -> None:
    """Write the features of a list of images to one `.npz` (arrays of all images
    concatenated, plus offsets), atomically: a temporary file beside `path`, then a rename."""
    dims = {f.descriptors.shape[1] for f in features if len(f)}
    if len(dims) > 1:
        raise ValueError(f"features: every image's descriptors must have the same length, "
                         f"got {sorted(dims)}")
    dim = dims.pop() if dims else (features[0].descriptors.shape[1] if features else 128)
    counts = np.array([len(f) for f in features], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xy = np.concatenate([f.xy for f in features]) if features else np.zeros((0, 2))
    desc = (np.concatenate([f.descriptors.reshape(-1, dim) for f in features]) if features
            else np.zeros((0, dim)))
    sizes = np.array([f.image_size for f in features], dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # A file handle, not a name: numpy would append ".npz" to a name without it.
        np.savez(handle, version=np.int64(FEATURE_FILE_VERSION),
                 xy=xy.astype(np.float32), descriptors=desc.astype(np.float32),
                 offsets=offsets, image_sizes=sizes)


def _check_file(path: Path, ok: bool, expected: str) -> None:
    if not ok:
        raise FeatureFileError(f"{path}: not a local-feature file of this version: expected "
                               f"{expected}; delete it to have it recomputed")


def load_features(path: str | Path) -> list[LocalFeatures]:
    """The list `save_features` wrote to `path`. A missing file is FileNotFoundError; a file
    of another structure is `FeatureFileError` naming it and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: local-feature file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in _FILE_KEYS if key not in data.files]
            _check_file(path, not missing, f"arrays {list(_FILE_KEYS)} (missing {missing})")
            arrays = {key: data[key] for key in _FILE_KEYS}
    except FeatureFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FeatureFileError(f"{path}: unreadable local-feature file (expected an .npz "
                               f"written by save_features): {exc}") from exc
    version, xy, desc = arrays["version"], arrays["xy"], arrays["descriptors"]
    offsets, sizes = arrays["offsets"], arrays["image_sizes"]
    _check_file(path, version.shape == () and int(version) == FEATURE_FILE_VERSION,
                f"version {FEATURE_FILE_VERSION}, got {version!r}")
    _check_file(path, xy.ndim == 2 and xy.shape[1] == 2 and xy.dtype == np.float32,
                f"xy float32 (K, 2), got {xy.dtype} {xy.shape}")
    _check_file(path, desc.ndim == 2 and len(desc) == len(xy) and desc.dtype == np.float32,
                f"descriptors float32 ({len(xy)}, D), got {desc.dtype} {desc.shape}")
    _check_file(path, offsets.ndim == 1 and len(offsets) >= 1
                and np.issubdtype(offsets.dtype, np.integer),
                f"offsets: a 1-D integer array, got {offsets.dtype} {offsets.shape}")
    _check_file(path, offsets[0] == 0 and offsets[-1] == len(xy)
                and bool(np.all(np.diff(offsets) >= 0)),
                f"offsets rising from 0 to {len(xy)} keypoints")
    _check_file(path, sizes.shape == (len(offsets) - 1, 2) and bool(np.all(sizes >= 1)),
                f"image_sizes ({len(offsets) - 1}, 2) >= 1, got {sizes.shape}")
    return [LocalFeatures(xy[start:end], desc[start:end], (int(h), int(w)))
            for start, end, (h, w) in zip(offsets[:-1], offsets[1:], sizes, strict=True)]


# --------------------------------------------------------------------------- matching


def _canonical(a: LocalFeatures, b: LocalFeatures) -> tuple[LocalFeatures, LocalFeatures]:
    """(a, b) or (b, a), the same for both orders, decided by content, cheapest test first:
    what is computed from the pair can then depend on the order without breaking symmetry."""
    keys = ((lambda f: len(f)), (lambda f: f.image_size), (lambda f: f.xy.tobytes()),
            (lambda f: f.descriptors.tobytes()))
    for key in keys:
        ka, kb = key(a), key(b)
        if ka != kb:
            return (a, b) if ka < kb else (b, a)
    return a, b  # equal content: either order gives the same count


def _best_two(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of `sim`: the column of the largest value, that value, and the second
    largest (two argmax passes: far faster than a partial sort on these sizes)."""
    rows = np.arange(len(sim))
    best = sim.argmax(axis=1)
    first = sim[rows, best]
    rest = sim.copy()
    rest[rows, best] = -np.inf
    return best, first, rest.max(axis=1)


def putative_matches(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO,
                     mutual: bool = MUTUAL) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into a, into b) of descriptor matches that pass Lowe's ratio test (best
    distance < `ratio` x second best), both ways and mutual when `mutual`, at most one per
    keypoint location, best match first. Needs two keypoints on each side."""
    # OpenCV's single product, not numpy's: OpenBLAS's threads slow to a crawl on a busy
    # machine and multiply with a thread pool's (measured: 1 ms against 2-16 ms at 512 x 512).
    sim = cv2.gemm(a.descriptors, b.descriptors, 1.0, None, 0.0, flags=cv2.GEMM_2_T)
    to_b, first, second = _best_two(sim)
    dist_first, dist_second = 2.0 - 2.0 * first, 2.0 - 2.0 * second
    keep = dist_first < ratio**2 * dist_second
    if mutual:
        to_a, col_first, col_second = _best_two(np.ascontiguousarray(sim.T))
        col_ok = (2.0 - 2.0 * col_first) < ratio**2 * (2.0 - 2.0 * col_second)
        keep &= (to_a[to_b] == np.arange(len(a))) & col_ok[to_b]
    ia = np.flatnonzero(keep)
    ib = to_b[ia]
    # SIFT gives one keypoint per dominant orientation, several at one location: count a
    # location once, with its best match, so that duplicates cannot inflate the inliers.
    order = np.argsort(dist_first[ia], kind="stable")
    ia, ib = ia[order], ib[order]
    for side in (0, 1):
        points = a.xy[ia] if side == 0 else b.xy[ib]
        # (x, y) float32 pairs viewed as one int64 each: a fast, exact 1-D unique.
        as_int = np.ascontiguousarray(points).view(np.int64).ravel()
        first_seen = np.sort(np.unique(as_int, return_index=True)[1])
        ia, ib = ia[first_seen], ib[first_seen]
    return ia, ib


def _frame(features: LocalFeatures, idx: np.ndarray) -> np.ndarray:
    """Keypoints `idx` in a frame where the image's longer side is `_FRAME_SIDE` long."""
    return features.xy[idx] * np.float32(_FRAME_SIDE / max(features.image_size))


def _fit(src: np.ndarray, dst: np.ndarray, threshold: float, method: str, model: str,
         max_iters: int, confidence: float, seed: int) -> np.ndarray:
    """Inlier mask (bool, one per match) of the robust fit of `model` to the matches
    src -> dst (all False when degenerate)."""
    flag = MATCH_METHODS[method]
    if method == "ransac":
        cv2.setRNGSeed(seed)  # plain RANSAC draws from OpenCV's per-thread generator
    if model == "homography":
        _, inliers = cv2.findHomography(src, dst, flag, threshold, maxIters=max_iters,
                                        confidence=confidence)
    elif model == "fundamental":
        _, inliers = cv2.findFundamentalMat(src, dst, flag, threshold, confidence, max_iters)
    elif method == "magsac":  # affine through USAC: estimateAffine2D's flags lack MAGSAC
        params = cv2.UsacParams()
        params.threshold, params.confidence = threshold, confidence
        params.maxIterations, params.randomGeneratorState = max_iters, seed
        params.score, params.loMethod = cv2.SCORE_METHOD_MAGSAC, cv2.LOCAL_OPTIM_SIGMA
        _, inliers = cv2.estimateAffine2D(src, dst, params=params)
    else:
        _, inliers = cv2.estimateAffine2D(src, dst, method=flag,
                                          ransacReprojThreshold=threshold,
                                          maxIters=max_iters, confidence=confidence)
    if inliers is None:
        return np.zeros(len(src), dtype=bool)
    return np.asarray(inliers).ravel().astype(bool)


def _check_match_args(min_matches: int, method: str, model: str, ratio: float,
                      ransac_threshold: float) -> None:
    if method not in MATCH_METHODS:
        raise ValueError(f"method must be one of {sorted(MATCH_METHODS)}, got {method!r}")
    if model not in GEOMETRIC_MODELS:
        raise ValueError(f"model must be one of {sorted(GEOMETRIC_MODELS)}, got {model!r}")
    if min_matches < GEOMETRIC_MODELS[model]:
        raise ValueError(f"min_matches must be >= {GEOMETRIC_MODELS[model]} (the matches that "
                         f"determine a {model}), got {min_matches}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if not ransac_threshold > 0:
        raise ValueError(f"ransac_threshold must be > 0 (a fraction of the image's longer "
                         f"side), got {ransac_threshold}")


def match_pair(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO,
               min_matches: int = MIN_MATCHES, ransac_threshold: float = RANSAC_THRESHOLD,
               method: str = METHOD, *, model: str = MODEL, mutual: bool = MUTUAL,
               max_iters: int = MAX_ITERS, confidence: float = CONFIDENCE,
               seed: int = SEED) -> int:
    """Geometric inliers between two images' features: descriptor matches
    (`putative_matches`) checked by a robust fit of `model` (homography | affine |
    fundamental) with `method` (magsac | ransac), an inlier being within `ransac_threshold` x
    the longer side of the image. 0 when there are fewer than `min_matches` putative matches.
    Symmetric and deterministic (see the module's conventions)."""
    return len(inlier_matches(a, b, ratio, min_matches, ransac_threshold, method, model=model,
                              mutual=mutual, max_iters=max_iters, confidence=confidence,
                              seed=seed)[0])


def inlier_matches(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO,
                   min_matches: int = MIN_MATCHES, ransac_threshold: float = RANSAC_THRESHOLD,
                   method: str = METHOD, *, model: str = MODEL, mutual: bool = MUTUAL,
                   max_iters: int = MAX_ITERS, confidence: float = CONFIDENCE,
                   seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The inlier matches `match_pair` counts, as keypoint coordinates: ((M, 2) in a's
    pixels, (M, 2) in b's), row t of each the two ends of match t (for pictures)."""
    _check_match_args(min_matches, method, model, ratio, ransac_threshold)
    empty = np.zeros((0, 2), dtype=np.float32)
    first, second = _canonical(a, b)
    if min(len(a), len(b)) < max(min_matches, 2):
        return empty, empty
    i1, i2 = putative_matches(first, second, ratio, mutual)
    if len(i1) < min_matches:
        return empty, empty
    keep = _fit(_frame(first, i1), _frame(second, i2), ransac_threshold * _FRAME_SIDE, method,
                model, max_iters, confidence, seed)
    xy1, xy2 = first.xy[i1[keep]], second.xy[i2[keep]]
    return (xy1, xy2) if first is a else (xy2, xy1)


# --------------------------------------------------------------------------- shortlist


def _similarity_rows(similarity: np.ndarray | Callable[[np.ndarray], np.ndarray], n: int,
                     rows: np.ndarray) -> np.ndarray:
    block = similarity[rows] if isinstance(similarity, np.ndarray) else similarity(rows)
    block = np.asarray(block, dtype=np.float64)
    if block.shape != (len(rows), n):
        raise ValueError(f"similarity: rows {rows[0]}..{rows[-1]} must have shape "
                         f"({len(rows)}, {n}), got {block.shape}")
    if np.isnan(block).any():
        raise ValueError(f"similarity: NaN in rows {rows[0]}..{rows[-1]}; expected numbers")
    return block


def shortlist_pairs(similarity: np.ndarray | Callable[[np.ndarray], np.ndarray], top_b: int,
                    n: int | None = None, block_rows: int = SHORTLIST_BLOCK
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The pairs to verify: for each image i the `top_b` other images of highest similarity
    (self excluded; ties to the lower index; top_b is capped at N - 1), as unordered pairs
    (rows < cols), each once, sorted by (row, col): int64 arrays. At most N x top_b pairs.

    `similarity` is an (N, N) array, or a function that returns the (len(idx), N) rows
    `idx` of it (give `n`), read `block_rows` rows at a time so that N^2 is never held."""
    if top_b < 1:
        raise ValueError(f"top_b must be >= 1 (gallery images verified per query), got {top_b}")
    if not callable(similarity):
        similarity = np.asarray(similarity)
        if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
            raise ValueError(f"similarity must be a square (N, N) array, got shape "
                             f"{similarity.shape}")
        if n is not None and n != len(similarity):
            raise ValueError(f"n = {n} but similarity is {similarity.shape}")
        n = len(similarity)
    elif n is None:
        raise ValueError("n (the number of images) is required when similarity is a function")
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top_b = min(top_b, n - 1)
    keys = []
    for start in range(0, n, block_rows):
        rows = np.arange(start, min(n, start + block_rows))
        block = _similarity_rows(similarity, n, rows)
        # A stable sort of -sim ranks ties by index; self is dropped wherever it lands.
        order = np.argsort(-block, axis=1, kind="stable")
        order = order[order != rows[:, None]].reshape(len(rows), n - 1)[:, :top_b]
        lo = np.minimum(order, rows[:, None])
        hi = np.maximum(order, rows[:, None])
        keys.append(np.unique(lo * n + hi))
    keys = np.unique(np.concatenate(keys))
    return keys // n, keys % n


# --------------------------------------------------------------------------- verification


def _check_pairs(n: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.asarray(rows), np.asarray(cols)
    for name, arr in (("rows", rows), ("cols", cols)):
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"{name} must be a 1-D array of image indices, got {arr.dtype} "
                             f"{arr.shape}")
    if len(rows) != len(cols):
        raise ValueError(f"rows and cols must have the same length (one pair each), got "
                         f"{len(rows)} and {len(cols)}")
    for name, arr in (("rows", rows), ("cols", cols)):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"{name} must be image indices in [0, {n}), got values from "
                             f"{arr.min()} to {arr.max()}")
    if np.any(rows == cols):
        raise ValueError(f"rows and cols must differ (an image is not verified against "
                         f"itself); pair {int(np.flatnonzero(rows == cols)[0])} does not")
    return rows.astype(np.int64), cols.astype(np.int64)


def verify_pairs(features: Sequence[LocalFeatures], rows: np.ndarray, cols: np.ndarray,
                 ratio: float = RATIO, min_matches: int = MIN_MATCHES,
                 ransac_threshold: float = RANSAC_THRESHOLD, method: str = METHOD, *,
                 model: str = MODEL, mutual: bool = MUTUAL, max_iters: int = MAX_ITERS,
                 confidence: float = CONFIDENCE, seed: int = SEED,
                 cache: dict[tuple[int, int], int] | None = None,
                 workers: int = 1,
                 match: Callable[[LocalFeatures, LocalFeatures], int] | None = None,
                 advance: Callable[[int], object] | None = None) -> np.ndarray:
    """Inlier count (`match_pair`) of each pair (features[rows[k]], features[cols[k]]): int32,
    in the order given. Each unordered pair is matched once. `cache` (keyed by (min, max)
    index) is read first and filled with what was computed; it must belong to these features
    and these settings. `workers` > 1 matches pairs in threads (OpenCV and numpy release the
    GIL); the counts do not depend on it. `match` replaces `match_pair` (and the matching
    arguments) by another symmetric counter, e.g. the learned matcher's. `advance(1)` after
    each pair matched (a progress bar)."""
    rows, cols = _check_pairs(len(features), rows, cols)
    _check_match_args(min_matches, method, model, ratio, ransac_threshold)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cache = {} if cache is None else cache
    keys = [(min(r, c), max(r, c)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    todo = sorted({key for key in keys if key not in cache})

    def run(key: tuple[int, int]) -> int:
        a, b = features[key[0]], features[key[1]]
        # match_pair looked up at call time, so tests can count the calls.
        inliers = match(a, b) if match is not None else match_pair(
            a, b, ratio, min_matches, ransac_threshold, method, model=model, mutual=mutual,
            max_iters=max_iters, confidence=confidence, seed=seed)
        if advance is not None:
            advance(1)
        return inliers

    if workers == 1 or len(todo) < 2:
        counts = [run(key) for key in todo]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            counts = list(pool.map(run, todo))
    cache.update(zip(todo, counts, strict=True))
    return np.array([cache[key] for key in keys], dtype=np.int32)


def inlier_matrix(n: int, rows: np.ndarray, cols: np.ndarray,
                  counts: np.ndarray) -> sparse.csr_matrix:
    """The counts as a symmetric (n, n) scipy CSR matrix (int32): entry (i, j) = (j, i) =
    inliers of pair (i, j). Its stored entries are exactly the verified pairs, a verified pair
    with 0 inliers included as an explicit zero (`m.nnz` counts both triangles), so "not
    verified" and "verified, nothing matched" stay apart: read the verified pairs from its
    structure (`m.indptr`, `m.indices`, or `dense_inliers`), and do not call `eliminate_zeros`
    on it. Sparse, so that any N fits (the pairs are N x B at most). A pair given twice must
    have the same count both times."""
    rows, cols = _check_pairs(n, rows, cols)
    counts = np.asarray(counts)
    if counts.shape != rows.shape:
        raise ValueError(f"counts must have one value per pair, shape {rows.shape}, got "
                         f"{counts.shape}")
    keys = np.minimum(rows, cols) * n + np.maximum(rows, cols)
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if np.any(counts != counts[first][inverse]):
        raise ValueError("counts: a pair given twice has two different counts")
    lo, hi, value = unique // n, unique % n, counts[first].astype(np.int32)
    matrix = sparse.csr_matrix((np.concatenate([value, value]),
                                (np.concatenate([lo, hi]), np.concatenate([hi, lo]))),
                               shape=(n, n), dtype=np.int32)
    matrix.sort_indices()
    return matrix


def dense_inliers(matrix: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """An `inlier_matrix` as dense (n, n) arrays (inliers int32, verified bool): the
    (inliers, verified) pair of arrays the fusion step takes; unverified pairs hold 0."""
    matrix = sparse.csr_matrix(matrix)
    verified = np.zeros(matrix.shape, dtype=bool)
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    verified[rows, matrix.indices] = True
    return matrix.toarray().astype(np.int32), verified
