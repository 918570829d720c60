"""Data-check report: what the competition data looks like and every problem found in it.

`image_cache` decodes each image once (through `images.decode_image`, as every reader does)
and hands back one record per image (size as seen, upright, mode, mask coverage, pHash,
problems, and what the pipeline did about them: an EXIF orientation applied, an empty mask
taken for the whole image, ...). This module turns those records, plus the near-duplicate
groups and cross-identity pairs from `dedup`, into `report.md` (with figures) and
`summary.json`. No image is decoded here.

Every record with a problem is listed in the report with its action: a data check that drops
problems silently is worse than none, because it makes a broken dataset look clean.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaguar_reid import layout
from jaguar_reid.config import load_config
from jaguar_reid.data.csv_tables import (
    index_images,
    outside_root,
    pair_image_names,
    read_test_csv,
    read_train_csv,
)
from jaguar_reid.data.dedup import duplicate_groups, hex_to_hash
from jaguar_reid.data.image_cache import build_cache, empty_record, unusable_record
from jaguar_reid.io_utils import atomic_path, atomic_write_json, atomic_write_text
from jaguar_reid.plotting import pyplot
from jaguar_reid.text import markdown_table

REPORT_NAME = "report.md"
SUMMARY_NAME = "summary.json"
FIGURE_FILES = {
    "identity_counts": "identity_counts.png",
    "image_sizes": "image_sizes.png",
    "aspect_ratios": "aspect_ratios.png",
    "mask_coverage": "mask_coverage.png",
}
_QUANTILES = {"min": 0.0, "p05": 0.05, "median": 0.5, "p95": 0.95, "max": 1.0}
# Aspect ratios outside this range are piled into the edge bins of the histogram: one absurd
# 1 x 90000 image would otherwise squeeze every ordinary photo into a single bar.
_ASPECT_RANGE = (0.25, 4.0)
_NO_ACTION = "(no action recorded)"


# --------------------------------------------------------------------------- numbers


def quantiles(values: list[float] | np.ndarray) -> dict[str, float | None]:
    """min / 5% / median / 95% / max (numpy's default linear interpolation); None when empty."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return dict.fromkeys(_QUANTILES)
    return {k: float(np.quantile(arr, q)) for k, q in _QUANTILES.items()}


def problem_kind(problem: str) -> str:
    """The text before the first ':' ("unreadable: cannot identify image" -> "unreadable")."""
    return problem.split(":", 1)[0].strip()


def _count_stats(counts: list[int]) -> dict[str, float | None]:
    if not counts:
        return {"min": None, "median": None, "mean": None, "max": None}
    arr = np.asarray(counts, dtype=np.float64)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "mean": float(arr.mean()),
            "max": int(arr.max())}


def _split_order(split: str) -> tuple[int, str]:
    return ({"train": 0, "test": 1}.get(split, 2), split)


def _sizes(records: list[dict]) -> tuple[list[int], list[int], list[float]]:
    """Widths, heights and aspect ratios (w / h) of the images that could be read."""
    widths, heights, aspects = [], [], []
    for rec in records:
        w, h = rec["width"], rec["height"]
        if w is None or h is None:
            continue
        widths.append(int(w))
        heights.append(int(h))
        if h > 0:  # a 0-pixel height is reported as a problem by the cache, not divided by
            aspects.append(w / h)
    return widths, heights, aspects


def _mask_counts(records: list[dict]) -> tuple[int, int]:
    """Readable images without alpha, and images whose mask is empty."""
    kinds_per_record = [{problem_kind(p) for p in r["problems"]} for r in records]
    # Only images that were actually read can be said to lack alpha; a missing file is counted
    # as missing, not also as "no alpha".
    no_alpha = sum(1 for r in records if r["width"] is not None and r["mask_fraction"] is None)
    empty_mask = sum(
        1 for r, kinds in zip(records, kinds_per_record, strict=True)
        if (r["mask_fraction"] is not None and r["mask_fraction"] == 0) or "empty mask" in kinds
    )
    return no_alpha, empty_mask


def _duplicate_groups(train: list[dict], groups: np.ndarray) -> list[dict]:
    """The groups of two or more train images, in group-id order."""
    members: dict[int, list[int]] = defaultdict(list)
    for idx, gid in enumerate(groups.tolist()):
        members[int(gid)].append(idx)
    return [
        {"group": gid,
         "identities": sorted({str(train[i]["identity"]) for i in idx}),
         "filenames": [train[i]["filename"] for i in idx]}
        for gid, idx in sorted(members.items()) if len(idx) >= 2
    ]


def _cross_pairs(train: list[dict], cross_pairs: list[tuple[int, int, int]]) -> list[dict]:
    """The cross-identity pairs with file names and identities; an index outside is an error."""
    cross = []
    for i, j, dist in cross_pairs:
        if not (0 <= i < len(train) and 0 <= j < len(train)):
            raise ValueError(f"cross-identity pair ({i}, {j}) outside the {len(train)} train "
                             "records")
        cross.append({"filename_a": train[i]["filename"], "identity_a": train[i]["identity"],
                      "filename_b": train[j]["filename"], "identity_b": train[j]["identity"],
                      "distance": int(dist)})
    return cross


def _problems(records: list[dict]) -> list[dict]:
    """One row per problem of every record, with the record's action."""
    return [
        {"filename": r["filename"], "split": r["split"], "problem": p, "action": r["action"]}
        for r in records for p in r["problems"]
    ]


def summarise(records: list[dict], groups: np.ndarray,
              cross_pairs: list[tuple[int, int, int]]) -> dict:
    """All the report's numbers, JSON-ready (plain ints, floats, strings, lists, dicts).

    `groups` and `cross_pairs` index the train records in the order they appear in `records`.
    """
    train = [r for r in records if r["split"] == "train"]
    groups = np.asarray(groups)
    if groups.shape != (len(train),):
        raise ValueError(f"groups must have one id per train record: shape {groups.shape}, "
                         f"{len(train)} train records")

    split_counts = Counter(r["split"] for r in records)
    per_identity = Counter(r["identity"] for r in train if r["identity"] is not None)
    # Most images first; ties by name so the order is the same on every run.
    identity_counts = sorted(per_identity.items(), key=lambda kv: (-kv[1], kv[0]))
    widths, heights, aspects = _sizes(records)
    fractions = [float(r["mask_fraction"]) for r in records if r["mask_fraction"] is not None]
    no_alpha, empty_mask = _mask_counts(records)
    dup_groups = _duplicate_groups(train, groups)
    cross = _cross_pairs(train, cross_pairs)
    problems = _problems(records)
    kind_counts = Counter(problem_kind(p["problem"]) for p in problems)

    return {
        # train, test, then anything unexpected, so the report reads in the usual order
        "images": {"total": len(records),
                   **{k: split_counts[k] for k in sorted(split_counts, key=_split_order)}},
        "identities": len(per_identity),
        "unlabelled_train": sum(1 for r in train if r["identity"] is None),
        "identity_counts": [[name, n] for name, n in identity_counts],
        "images_per_identity": _count_stats([n for _, n in identity_counts]),
        "readable": len(widths),
        "width": quantiles(widths),
        "height": quantiles(heights),
        "aspect_ratio": quantiles(aspects),
        "mask_coverage": quantiles(fractions),
        "with_mask": len(fractions),
        "no_alpha": no_alpha,
        "empty_mask": empty_mask,
        "duplicate_groups": dup_groups,
        "n_duplicate_groups": len(dup_groups),
        "n_duplicate_images": sum(len(g["filenames"]) for g in dup_groups),
        "cross_identity_pairs": cross,
        "n_cross_identity_pairs": len(cross),
        "problems": problems,
        "n_problem_images": sum(1 for r in records if r["problems"]),
        "problem_counts": dict(sorted(kind_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


# --------------------------------------------------------------------------- markdown


def _cell(value: Any) -> str:
    """A table cell's text (markdown_table escapes '|' and newlines): None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        # Whole numbers stay whole; big ones are not worth scientific notation (58710 px).
        value = f"{value:.0f}" if value.is_integer() or abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    # split("\n"), not splitlines(): a cell may hold other line-break characters.
    return markdown_table(header, [[_cell(v) for v in row] for row in rows]).split("\n") + [""]


def _headline(s: dict) -> list[str]:
    """The table of headline numbers at the top of the report."""
    images = s["images"]
    ipi = s["images_per_identity"]
    headline = [["images", images["total"]]]
    headline += [[f"{split} images", n] for split, n in images.items() if split != "total"]
    headline += [
        ["identities", s["identities"]],
        ["images per identity (min / median / mean / max)",
         " / ".join(_cell(ipi[k]) for k in ("min", "median", "mean", "max"))],
        ["readable images", s["readable"]],
        ["images with a mask (alpha)", s["with_mask"]],
        ["readable images without alpha", s["no_alpha"]],
        ["images with an empty mask", s["empty_mask"]],
        ["images with problems", s["n_problem_images"]],
        ["near-duplicate groups (>= 2 images)", s["n_duplicate_groups"]],
        ["images in near-duplicate groups", s["n_duplicate_images"]],
        ["cross-identity near-duplicate pairs", s["n_cross_identity_pairs"]],
    ]
    if s["unlabelled_train"]:
        headline.append(["train images without identity", s["unlabelled_train"]])
    return _table(["", "value"], headline)


def _sizes_section(s: dict) -> list[str]:
    """Quantiles of width, height, aspect ratio and mask coverage."""
    lines = ["## Image sizes", ""]
    lines += _table(["", *_QUANTILES],
                    [[name, *(s[key][q] for q in _QUANTILES)]
                     for name, key in (("width (px)", "width"), ("height (px)", "height"),
                                       ("aspect ratio (w/h)", "aspect_ratio"),
                                       ("mask coverage", "mask_coverage"))])
    return lines


def _identities_section(s: dict) -> list[str]:
    lines = ["## Images per identity", ""]
    if s["identity_counts"]:
        return lines + _table(["identity", "images"], s["identity_counts"])
    return lines + ["No labelled train images.", ""]


def _problems_section(s: dict) -> list[str]:
    """Counts per problem kind, then every problem with its action."""
    lines = ["## Problems", ""]
    if not s["problems"]:
        return lines + ["No problems found: every image was read and none was flagged.", ""]
    lines += [f"{len(s['problems'])} problems in {s['n_problem_images']} images; "
              "every one is listed with what the pipeline did about it.", ""]
    lines += _table(["problem", "count"], list(s["problem_counts"].items()))
    lines += _table(["file", "split", "problem", "action"],
                    [[p["filename"], p["split"], p["problem"], p["action"] or _NO_ACTION]
                     for p in s["problems"]])
    return lines


def _duplicates_section(s: dict) -> list[str]:
    """Near-duplicate groups, then near-duplicates across identities."""
    lines = ["## Near-duplicates", ""]
    if s["duplicate_groups"]:
        lines += ["Groups of near-identical train images (pHash); folds keep each group on one "
                  "side.", ""]
        lines += _table(["group", "identity", "images", "files"],
                        [[g["group"], ", ".join(g["identities"]), len(g["filenames"]),
                          ", ".join(g["filenames"])] for g in s["duplicate_groups"]])
    else:
        lines += ["No near-duplicate groups.", ""]
    if s["cross_identity_pairs"]:
        lines += ["Near-duplicates across two identities (likely label errors):", ""]
        lines += _table(["file A", "identity A", "file B", "identity B", "Hamming distance"],
                        [[c["filename_a"], c["identity_a"], c["filename_b"], c["identity_b"],
                          c["distance"]] for c in s["cross_identity_pairs"]])
    else:
        lines += ["No near-duplicates across identities.", ""]
    return lines


def _figures_section(figures: dict[str, str]) -> list[str]:
    """An image link per figure; nothing when there are no figures."""
    if not figures:
        return []
    lines = ["## Figures", ""]
    for name, filename in figures.items():
        lines += [f"![{name.replace('_', ' ')}]({filename})", ""]
    return lines


def render_markdown(summary: dict, figures: dict[str, str]) -> str:
    """The report as Markdown; `figures` maps a figure name to its file name beside the report."""
    lines = ["# Data check", ""]
    lines += _headline(summary)
    lines += _sizes_section(summary)
    lines += _identities_section(summary)
    lines += _problems_section(summary)
    lines += _duplicates_section(summary)
    lines += _figures_section(figures)
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- figures


def _note(ax: Any, text: str) -> None:
    """A centred message instead of an empty plot."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _paint_identity_counts(ax: Any, counts: list[list]) -> None:
    if not counts:
        return _note(ax, "no labelled train images")
    names = [c[0] for c in counts]
    ax.bar(range(len(names)), [c[1] for c in counts])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("images")
    ax.set_title("Train images per identity")


def _paint_image_sizes(ax: Any, widths: list[int], heights: list[int]) -> None:
    if not widths:
        return _note(ax, "no readable images")
    ax.scatter(widths, heights, s=8, alpha=0.5)
    # Log axes: an absurd 1 x 90000 image stays on the plot without flattening the rest.
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image sizes")


def _paint_aspect_ratios(ax: Any, aspects: list[float]) -> None:
    if not aspects:
        return _note(ax, "no readable images")
    lo, hi = _ASPECT_RANGE
    outside = sum(1 for a in aspects if not lo <= a <= hi)
    ax.hist(np.clip(aspects, lo, hi), bins=40, range=(lo, hi))
    ax.set_xlabel("aspect ratio (w/h)")
    ax.set_ylabel("images")
    title = "Aspect ratios"
    if outside:
        title += f" ({outside} outside [{lo}, {hi}] shown at the edges)"
    ax.set_title(title)


def _paint_mask_coverage(ax: Any, fractions: list[float]) -> None:
    if not fractions:
        return _note(ax, "no image has an alpha mask")
    ax.hist(fractions, bins=40, range=(0.0, 1.0))
    ax.set_xlabel("share of pixels inside the mask")
    ax.set_ylabel("images")
    ax.set_title(f"Mask coverage ({len(fractions)} images with alpha)")


def _save_figure(plt: Any, paint: Callable[[Any], None], size: tuple[float, float],
                 path: Path) -> None:
    """Paint one figure of `size` inches and write it atomically as a PNG."""
    fig, ax = plt.subplots(figsize=size)
    try:
        paint(ax)
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def plot_figures(summary: dict, records: list[dict], out_dir: Path) -> dict[str, str]:
    """Write the four PNG figures into `out_dir`; returns {name: file name}."""
    # Set up here, not at import: importing this module must not pull in a GUI backend.
    plt = pyplot()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    widths, heights, aspects = _sizes(records)
    fractions = [r["mask_fraction"] for r in records if r["mask_fraction"] is not None]
    painters: dict[str, Callable[[Any], None]] = {
        "identity_counts": lambda ax: _paint_identity_counts(ax, summary["identity_counts"]),
        "image_sizes": lambda ax: _paint_image_sizes(ax, widths, heights),
        "aspect_ratios": lambda ax: _paint_aspect_ratios(ax, aspects),
        "mask_coverage": lambda ax: _paint_mask_coverage(ax, fractions),
    }
    n_ids = len(summary["identity_counts"])
    written = {}
    for name, paint in painters.items():
        # Bar chart grows with the number of identities so the names stay legible.
        size = (max(6.0, 0.25 * n_ids), 4.0) if name == "identity_counts" else (6.0, 4.0)
        _save_figure(plt, paint, size, out_dir / FIGURE_FILES[name])
        written[name] = FIGURE_FILES[name]
    return written


# --------------------------------------------------------------------------- report


def write_report(records: list[dict], groups: np.ndarray,
                 cross_pairs: list[tuple[int, int, int]], out_dir: Path) -> Path:
    """Write `report.md`, `summary.json` and the figures into `out_dir`; returns the report path.

    Both text files are written atomically, so a crash leaves the previous report intact; an
    older report in the same folder is replaced, and said so.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(records, groups, cross_pairs)
    report = out_dir / REPORT_NAME
    if report.exists():
        print(f"replacing {report}")
    figures = plot_figures(summary, records, out_dir)
    atomic_write_json(out_dir / SUMMARY_NAME, summary)
    atomic_write_text(report, render_markdown(summary, figures))
    return report


# --------------------------------------------------------------------------- command line


def collect_records(cfg) -> tuple[list[dict], np.ndarray, list[tuple[int, int, int]]]:
    """Records for every train and test image (decoded once, through the cache), the
    near-duplicate groups of the train images and the cross-identity pairs."""

    files = layout.data_files(cfg)
    train_df = read_train_csv(files.train)
    names = {"train": list(train_df["filename"]),
             "test": pair_image_names(read_test_csv(files.test))}
    identity = dict(zip(train_df["filename"], train_df["ground_truth"], strict=True))
    index = index_images(files.root)
    records: list[dict] = []
    for split, split_names in names.items():
        found = {n: index[Path(n).name] for n in split_names if index.get(Path(n).name)}
        # A link out of the data folder is reported, never decoded: the CSVs and the folder's
        # links are not trusted to choose what is read.
        escaped = {n: real for n in found
                   if (real := outside_root(files.root, found[n][0])) is not None}
        present = [n for n in split_names if n in found and n not in escaped]
        _, built = build_cache([found[n][0] for n in present], cfg, f"{split} images",
                               raise_on_error=False)
        by_name = dict(zip(present, built, strict=True))
        for name in split_names:
            if name in by_name:
                record = dict(by_name[name])  # the cache's own record stays as it was
            elif name in escaped:
                record = unusable_record(
                    {**empty_record(Path(name)), "path": str(found[name][0])},
                    f"outside data.dir: leads to {escaped[name]}")
            else:
                record = unusable_record({**empty_record(Path(name)), "path": None}, "missing")
            if len(found.get(name, [])) > 1:
                record["problems"] = [*record["problems"],
                                      f"found {len(found[name])} times beneath data.dir"]
            record.update(split=split, identity=identity.get(name) if split == "train" else None)
            records.append(record)
    train = [r for r in records if r["split"] == "train"]
    bits = np.stack([hex_to_hash(r["phash"]) if r["phash"] else np.zeros(64, bool)
                     for r in train])
    groups, cross = duplicate_groups(bits, np.array([r["identity"] for r in train]),
                                     cfg.folds.dup_threshold)
    # An unreadable image has no hash; it must not join another one's group.
    unreadable = [i for i, r in enumerate(train) if not r["phash"]]
    if unreadable:
        groups = groups.copy()
        groups[unreadable] = groups.max() + 1 + np.arange(len(unreadable))
        cross = [p for p in cross if p[0] not in unreadable and p[1] not in unreadable]
    return records, groups, cross


def main(argv: list[str]) -> None:
    """`python -m jaguar_reid.datacheck [config=...] data.dir=...`: report in
    <output_dir>/datacheck/<data folder name>/."""

    cfg = load_config(argv)
    records, groups, cross = collect_records(cfg)
    out_dir = layout.datacheck_dir(cfg)
    path = write_report(records, groups, cross, out_dir)
    n_problems = sum(1 for r in records if r["problems"])
    print(f"data check: {len(records)} images, {n_problems} with problems -> {path}")
