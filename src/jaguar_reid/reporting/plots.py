"""The report's figures: matplotlib drawings of an `Analysis`, each returned as PNG bytes.

Bare Figures from `jaguar_reid.plotting` (no pyplot): no global state, no GUI backend, safe in
worker processes. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from jaguar_reid.plotting import new_figure, png_bytes, setup_matplotlib
from jaguar_reid.reporting.analysis import Analysis, thin_curve
from jaguar_reid.reporting.reading import THUMB_PX

# Every figure the report can make; a rebuild removes the ones it could not make this time,
# so a stale figure never sits beside a page that says its data is missing.
FIGURES = {
    "training_curves.png": "Training curves",
    "roc.png": "ROC curves per fold",
    "similarity_hist.png": "Positive vs negative pair similarities",
    "ap_per_identity.png": "AP per identity",
    "worst_queries.png": "Worst queries",
    "local_matches.png": "Matched keypoints of the worst queries' top candidates",
}
# Match lines drawn per image pair: more hide the coat they are drawn on.
MAX_MATCH_LINES = 80
# Bars for identities: beyond this the chart is unreadable; the worst are kept.
MAX_IDENTITIES_SHOWN = 60
# Points kept per ROC curve: a fold of 400 images has 80k pairs; the eye needs far fewer.
ROC_POINTS = 2000
# The zoomed ROC panel's right edge: where runs whose AUCs are all near 1 still differ.
ROC_ZOOM_FPR = 0.1
HIST_BINS = 40


def letterbox(image: np.ndarray, size: int, fill: int = 255) -> np.ndarray:
    """(h, w, 3) with h, w <= size -> (size, size, 3), the image centred: every cell of a strip
    gets the same frame whatever the photo's shape."""
    h, w = image.shape[:2]
    out = np.full((size, size, 3), fill, np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = image[:size, :size, :3]
    return out


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]]) -> bytes:
    """One ROC curve per fold: (fold, fpr, tpr, auc); beside it the low false-positive end,
    where runs with AUCs near 1 differ."""
    fig = new_figure(10, 4.8)
    full_ax, zoom_ax = fig.subplots(1, 2)
    for name, fpr, tpr, auc in curves:
        x, y = thin_curve(fpr, tpr, ROC_POINTS)
        full_ax.plot(x, y, label=f"fold {name} (AUC {auc:.4f})")
        low = fpr <= ROC_ZOOM_FPR
        zoom_ax.plot(*thin_curve(fpr[low], tpr[low], ROC_POINTS), label=f"fold {name}")
    full_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    full_ax.set(xlabel="false positive rate (different identities)",
                ylabel="true positive rate (same identity)", xlim=(0, 1), ylim=(0, 1.01),
                title="Pair ROC per fold (out of fold)")
    full_ax.legend(loc="lower right")
    zoom_ax.set(xlabel="false positive rate", ylabel="true positive rate",
                xlim=(0, ROC_ZOOM_FPR), title=f"false positive rate up to {ROC_ZOOM_FPR}")
    zoom_ax.legend(loc="lower right")
    return png_bytes(fig)


def plot_similarity_histograms(
        per_fold: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """Per fold, densities of same-identity vs different-identity pair cosine similarity."""
    cols = min(len(per_fold), 3)
    rows = math.ceil(len(per_fold) / cols)
    fig = new_figure(4.2 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, pos, neg) in zip(axes, per_fold, strict=False):
        both = np.concatenate([pos, neg])
        # Shared edges so both densities are comparable; one value only: let numpy pick.
        bins = (np.linspace(both.min(), both.max(), HIST_BINS + 1)
                if both.size and both.min() < both.max() else HIST_BINS)
        for values, colour, kind in ((neg, "tab:red", "different"), (pos, "tab:green", "same")):
            if values.size:  # an empty density is 0/0
                ax.hist(values, bins=bins, density=True, alpha=0.55, color=colour,
                        label=f"{kind} ({values.size})")
        ax.set(title=f"fold {name}", xlabel="cosine similarity", ylabel="density")
        ax.legend(fontsize="small")
    for ax in axes[len(per_fold):]:
        ax.set_visible(False)
    return png_bytes(fig)


def plot_identity_ap(rows: Sequence[dict]) -> bytes:
    """Sorted bars of AP per identity (worst at the top, image count beside each) and AP
    against image count: rare identities are where scores fall."""
    mpl = setup_matplotlib()
    scored = [r for r in rows if not math.isnan(r["ap"])]
    shown = scored[:MAX_IDENTITIES_SHOWN]
    fig = new_figure(11, max(3.0, 0.22 * len(shown) + 1.2))
    bar_ax, scatter_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    counts = np.array([r["images"] for r in scored])
    norm = mpl.colors.Normalize(vmin=counts.min(), vmax=max(counts.max(), counts.min() + 1))
    cmap = mpl.colormaps["viridis"]
    y = np.arange(len(shown))
    bar_ax.barh(y, [r["ap"] for r in shown], color=[cmap(norm(r["images"])) for r in shown])
    bar_ax.set_yticks(y, [f"{r['identity']} ({r['images']})" for r in shown], fontsize=7)
    bar_ax.invert_yaxis()
    bar_ax.set(xlim=(0, 1.0), xlabel="mean AP of the identity's queries")
    more = f", worst {len(shown)} of {len(scored)}" if len(scored) > len(shown) else ""
    bar_ax.set_title(f"AP per identity (images out of fold){more}")
    scatter_ax.scatter(counts, [r["ap"] for r in scored], c=counts, cmap=cmap, norm=norm, s=18)
    scatter_ax.set(xlabel="images of the identity (out of fold)", ylabel="AP", ylim=(0, 1.02),
                   title="AP against image count")
    if counts.max() / max(counts.min(), 1) > 20:
        scatter_ax.set_xscale("log")
    return png_bytes(fig)


def plot_training_curves(logs: Sequence[tuple[str, pd.DataFrame]]) -> bytes:
    """Loss, learning rate and validation mAP / pair AUC per epoch, one line per fold."""
    fig = new_figure(10, 6.5)
    axes = fig.subplots(2, 2).ravel()
    panels = [("loss", "training loss"), ("lr", "learning rate (largest group)"),
              ("map", "validation identity-balanced mAP"), ("pair_auc", "validation pair AUC")]
    for ax, (column, title) in zip(axes, panels, strict=True):
        drawn = False
        for name, log in logs:
            if column in log.columns and "epoch" in log.columns:
                values = pd.to_numeric(log[column], errors="coerce")
                if values.notna().any():
                    ax.plot(log["epoch"], values, marker="o", markersize=3, label=f"fold {name}")
                    drawn = True
        ax.set(title=title, xlabel="epoch (0 = before training)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not in the logs", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    return png_bytes(fig)


def _strip_cells(strip: dict) -> list[tuple[str, str, str]]:
    """(image name, frame colour, title) of a strip's query and its hits, in order."""
    cells = [(strip["query"], "tab:blue",
              f"query, fold {strip['fold']}\n{strip['identity']}\nAP {strip['ap']:.3f}")]
    cells += [(hit["filename"], "tab:green" if hit["right"] else "tab:red",
               f"#{rank} {'right' if hit['right'] else 'wrong'}\n{hit['identity']}\n"
               f"sim {hit['sim']:.3f}") for rank, hit in enumerate(strip["hits"], 1)]
    return cells


def _draw_cell(ax, image: np.ndarray | None, colour: str, title: str) -> None:
    """One framed thumbnail of a strip; a grey placeholder where the image is missing."""
    if image is None:
        ax.imshow(np.full((THUMB_PX, THUMB_PX, 3), 200, np.uint8))
        ax.text(0.5, 0.5, "image\nnot found", ha="center", va="center",
                transform=ax.transAxes, fontsize=7, color="dimgrey")
    else:
        ax.imshow(letterbox(image, THUMB_PX))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(color=colour, linewidth=4)
    ax.set_title(title, fontsize=6.5)


def plot_retrieval_strips(strips: Sequence[dict],
                          thumbs: dict[str, np.ndarray | None]) -> bytes:
    """One row per query: the query (blue frame), then its top-k, green frame = same identity,
    red = wrong; a grey placeholder where an image file is missing."""
    k = max((len(s["hits"]) for s in strips), default=0)
    fig = new_figure(1.45 * (k + 1), 1.9 * len(strips))
    axes = np.atleast_2d(fig.subplots(len(strips), k + 1, squeeze=False))
    for row, strip in zip(axes, strips, strict=True):
        cells = _strip_cells(strip)
        for ax, (name, colour, title) in zip(row, cells, strict=False):
            _draw_cell(ax, thumbs.get(name), colour, title)
        for ax in row[len(cells):]:
            ax.set_visible(False)
    return png_bytes(fig)


def _side_by_side(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, int]:
    """Two grayscale images on one white canvas, tops aligned; the right one's x offset."""
    height = max(left.shape[0], right.shape[0])
    canvas = np.full((height, left.shape[1] + right.shape[1]), 255, dtype=np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1]:] = right
    return canvas, left.shape[1]


def plot_local_matches(panels: Sequence[dict]) -> bytes:
    """One row per (query, candidate): the two images side by side with a line per inlier
    match, titled with the inlier count; green title = same identity, red = wrong."""
    fig = new_figure(7.0, 2.6 * len(panels))
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)[:, 0])
    for ax, panel in zip(axes, panels, strict=True):
        canvas, offset = _side_by_side(*panel["images"])
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255)
        (xy_q, xy_c) = panel["points"]
        for (x0, y0), (x1, y1) in list(zip(xy_q, xy_c, strict=True))[:MAX_MATCH_LINES]:
            ax.plot([x0, x1 + offset], [y0, y1], color="#1f9e3a", linewidth=0.7)
        verdict = "same identity" if panel["right"] else "wrong identity"
        ax.set_title(f"{panel['query']} vs {panel['candidate']}: {panel['inliers']} inliers "
                     f"({verdict})", fontsize=8,
                     color="#1f7a30" if panel["right"] else "#b3261e")
        ax.set_axis_off()
    return png_bytes(fig)


def make_figures(analysis: Analysis) -> dict[str, bytes]:
    """{FIGURES name: PNG} of every figure whose inputs the experiment has."""
    figures: dict[str, bytes] = {}
    if analysis.logs:
        figures["training_curves.png"] = plot_training_curves(analysis.logs)
    if analysis.curves:
        figures["roc.png"] = plot_roc(analysis.curves)
        figures["similarity_hist.png"] = plot_similarity_histograms(analysis.hists)
    if any(not math.isnan(r["ap"]) for r in analysis.identity_rows):
        figures["ap_per_identity.png"] = plot_identity_ap(analysis.identity_rows)
    if analysis.strips:
        figures["worst_queries.png"] = plot_retrieval_strips(analysis.strips, analysis.thumbs)
    if analysis.matches:
        figures["local_matches.png"] = plot_local_matches(analysis.matches)
    return figures
