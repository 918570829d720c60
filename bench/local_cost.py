"""Local-feature verification: cost per image and per verified pair, side by side in one run.

    python bench/local_cost.py                                   # real photos if ../shared has them
    python bench/local_cost.py --source synthetic --size 1500 1000
    python bench/local_cost.py --max-sides 256 512 --caps 256 512 --images 16 --pairs 60

Images: the dogfacenet-reid photos of ../shared/datasets (224 px JPEG, so no working size
resizes them), else synthetic "coats": RGBA PNGs of `--size` pixels, each a random view
(rotation, scale, perspective, smooth bending, lighting) of one of `--images / 4` spot
patterns, the animal an ellipse in the alpha mask. Four images per individual either way.

For every working size (`--max-sides`) and keypoint cap (`--caps`) it prints: keypoints per
image, ms per image to read the file (decode, gray, resize) and to run SIFT, ms per pair of
descriptor matching (cv2.gemm + mutual ratio test, as `match_pair` does) against OpenCV's
brute-force knnMatch both ways on the same descriptors, ms per verified pair (matching +
geometric check, `verify_pairs`), the share of pairs with enough matches to reach the
geometric check, the mean inliers of same-individual and different pairs, and the whole step
extrapolated to the competition's test set: 371 images, B = `--top-b` gallery images per query,
so at most 371 x B unique pairs (371 x B / 2 when every shortlist is mutual). Pairs are half
same-individual, half different (a shortlist mixes both).

Timings depend on what else the machine runs: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from jaguar_reid.retrieval.local import (  # noqa: E402
    MIN_MATCHES,
    putative_matches,
    read_for_features,
    sift_features,
    verify_pairs,
)

DOGS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dogfacenet-reid"
TEST_IMAGES = 371  # test images of the competition
PER_ID = 4


# --------------------------------------------------------------------------- images


def real_images(folder: Path, n: int) -> tuple[list[Path], np.ndarray]:
    """`n` training photos, PER_ID of each of the first identities that have that many."""
    by_id: dict[str, list[str]] = {}
    with open(folder / "train.csv") as handle:
        for row in csv.DictReader(handle):
            by_id.setdefault(row["ground_truth"], []).append(row["filename"])
    paths, labels = [], []
    for label, (_, names) in enumerate(sorted(by_id.items())):
        if len(names) < PER_ID:
            continue
        paths += [folder / "train" / name for name in sorted(names)[:PER_ID]]
        labels += [label] * PER_ID
        if len(paths) >= n:
            break
    return paths[:n], np.array(labels[:n])


def coat(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A spot pattern twice the image's size (views are cut from it): dark rosette-like rings
    and blobs on a tawny ground, as grayscale."""
    big = (height * 2, width * 2)
    img = np.clip(165 + rng.normal(0, 8, big), 0, 255).astype(np.uint8)
    for _ in range(int(big[0] * big[1] / 2500)):
        centre = (int(rng.integers(0, big[1])), int(rng.integers(0, big[0])))
        axes = (int(rng.integers(6, 28)), int(rng.integers(6, 28)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(img, centre, axes, angle, 0, 360, int(rng.integers(10, 80)),
                    int(rng.integers(3, 7)) if rng.random() < 0.6 else -1)
    return cv2.GaussianBlur(img, (0, 0), 1.2)


def view(pattern: np.ndarray, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One photo of a coat: cut, rotated, scaled, in perspective, bent, relit; RGBA with an
    elliptical animal in the alpha channel."""
    centre = np.array([pattern.shape[1] / 2, pattern.shape[0] / 2])
    scale = rng.uniform(0.7, 1.1)
    affine = cv2.getRotationMatrix2D(tuple(centre), rng.uniform(-25, 25), scale)
    affine[:, 2] += np.array([width / 2, height / 2]) - centre
    homography = np.vstack([affine, [rng.uniform(-1e-4, 1e-4), rng.uniform(-1e-4, 1e-4), 1]])
    img = cv2.warpPerspective(pattern, homography, (width, height), borderValue=165)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    amp = 0.03 * rng.uniform(0.5, 1.0)
    map_x = xx + amp * width * np.sin(yy / height * np.pi + rng.uniform(0, 6.3))
    map_y = yy + 0.5 * amp * height * np.sin(xx / width * 2 * np.pi + rng.uniform(0, 6.3))
    img = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderValue=165)
    img = np.clip(img * rng.uniform(0.7, 1.2) + rng.normal(0, 4, img.shape), 0, 255)
    alpha = np.zeros((height, width), np.uint8)
    cv2.ellipse(alpha, (width // 2, height // 2), (int(width * 0.45), int(height * 0.4)), 0, 0,
                360, 255, -1)
    rgb = np.stack([img, img * 0.85, img * 0.6], axis=2).astype(np.uint8)
    return np.dstack([rgb, alpha])


def synthetic_images(folder: Path, n: int, width: int, height: int,
                     seed: int) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for label in range((n + PER_ID - 1) // PER_ID):
        pattern = coat(rng, width, height)
        for k in range(PER_ID):
            path = folder / f"coat{label:03d}_{k}.png"
            Image.fromarray(view(pattern, rng, width, height), "RGBA").save(path)
            paths.append(path)
            labels.append(label)
    return paths[:n], np.array(labels[:n])


def bench_pairs(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` pairs, half same-individual, half different (seeded)."""
    rows, cols = np.triu_indices(len(labels), 1)
    same = labels[rows] == labels[cols]
    rng = np.random.default_rng(seed)
    pick_same = rng.permutation(np.flatnonzero(same))[: count // 2]
    pick_diff = rng.permutation(np.flatnonzero(~same))[: count - len(pick_same)]
    pick = np.sort(np.concatenate([pick_same, pick_diff]))
    return rows[pick], cols[pick]


# --------------------------------------------------------------------------- measurements


def per_call_ms(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / max(len(items), 1) * 1e3


def bf_both_ways(a, b) -> None:
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    matcher.knnMatch(a.descriptors, b.descriptors, k=2)
    matcher.knnMatch(b.descriptors, a.descriptors, k=2)


def measure(paths: list[Path], labels: np.ndarray, rows: np.ndarray, cols: np.ndarray,
            max_side: int, cap: int, top_b: int, workers: int) -> dict[str, float]:
    start = time.perf_counter()
    read = [read_for_features(path, max_side) for path in paths]
    read_ms = (time.perf_counter() - start) / len(paths) * 1e3
    start = time.perf_counter()
    features = [sift_features(gray, mask, cap) for gray, mask in read]
    sift_ms = (time.perf_counter() - start) / len(paths) * 1e3
    pairs = list(zip(rows.tolist(), cols.tolist(), strict=True))
    putative_matches(features[pairs[0][0]], features[pairs[0][1]])  # warm-up
    match_ms = per_call_ms(lambda p: putative_matches(features[p[0]], features[p[1]]), pairs)
    bf_ms = per_call_ms(lambda p: bf_both_ways(features[p[0]], features[p[1]]), pairs)
    start = time.perf_counter()
    counts = verify_pairs(features, rows, cols, workers=workers)
    verify_ms = (time.perf_counter() - start) / len(pairs) * 1e3
    matched = np.array([len(putative_matches(features[i], features[j])[0]) for i, j in pairs])
    same = labels[rows] == labels[cols]
    whole_s = (TEST_IMAGES * (read_ms + sift_ms) + TEST_IMAGES * top_b * verify_ms) / 1e3
    return {"keypoints": float(np.mean([len(f) for f in features])), "read_ms": read_ms,
            "sift_ms": sift_ms, "match_ms": match_ms, "bf_ms": bf_ms, "verify_ms": verify_ms,
            "geometry": float(np.mean(matched >= MIN_MATCHES)),
            "same": float(counts[same].mean()) if same.any() else float("nan"),
            "diff": float(counts[~same].mean()) if (~same).any() else float("nan"),
            "whole_s": whole_s}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["auto", "real", "synthetic"], default="auto")
    parser.add_argument("--data", type=Path, default=DOGS, help="a data set in the "
                        "competition layout with train.csv (default: ../shared dogfacenet)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, nargs=2, default=[1500, 1000],
                        metavar=("WIDTH", "HEIGHT"), help="synthetic image size")
    parser.add_argument("--pairs", type=int, default=120, help="pairs timed per setting")
    parser.add_argument("--max-sides", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--caps", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--top-b", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="verify_pairs threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    real = args.source == "real" or (args.source == "auto" and (args.data / "train.csv").is_file())
    with tempfile.TemporaryDirectory() as tmp:
        if real:
            paths, labels = real_images(args.data, args.images)
            with Image.open(paths[0]) as img:
                what = f"{len(paths)} real photos of {args.data.name} ({img.size[0]}x{img.size[1]})"
        else:
            width, height = args.size
            paths, labels = synthetic_images(Path(tmp), args.images, width, height, args.seed)
            what = f"{len(paths)} synthetic RGBA coats, {width}x{height}"
        rows, cols = bench_pairs(labels, args.pairs, args.seed)
        load = (", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg")
                else "?")
        print(f"Local-feature verification: {what}, {PER_ID} per individual; {len(rows)} pairs "
              f"({int((labels[rows] == labels[cols]).sum())} same individual); "
              f"{os.cpu_count()} CPUs, load average {load}; OpenCV threads "
              f"{cv2.getNumThreads()}, verify_pairs workers {args.workers}")
        print(f"whole step: {TEST_IMAGES} images read + SIFT, then {TEST_IMAGES} x "
              f"{args.top_b} pairs (the most unique pairs a shortlist of B = {args.top_b} can "
              f"give; half that when every shortlist is mutual)\n")
        print("| max_side | cap | keypoints/img | read ms/img | SIFT ms/img | match ms/pair "
              "| BFMatcher ms/pair | verify ms/pair | reach geometry | inliers same / diff "
              "| whole step s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for max_side in args.max_sides:
            for cap in args.caps:
                m = measure(paths, labels, rows, cols, max_side, cap, args.top_b, args.workers)
                print(f"| {max_side} | {cap} | {m['keypoints']:.0f} | {m['read_ms']:.1f} "
                      f"| {m['sift_ms']:.1f} | {m['match_ms']:.2f} | {m['bf_ms']:.2f} "
                      f"| {m['verify_ms']:.2f} | {m['geometry']:.0%} "
                      f"| {m['same']:.1f} / {m['diff']:.1f} | {m['whole_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
