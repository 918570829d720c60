"""Experiment report: `python -m src.report exp=NAME [config=...] [key=value ...]`.

One self-contained page per experiment for picking models: `output/<exp>/report/index.html`
(figures embedded as base64 PNG, no network, no scripts), the same figures as PNG files and a
Markdown summary beside it. It holds the out-of-fold scores per fold, raw and post-processed,
next to the local test score; ROC curves and similarity histograms; AP per identity with image
counts; retrieval strips of the worst queries; the training curves; the config and the code
version. It is built from whatever the experiment holds: a part whose files are missing (a
fold without a log, no postprocess.json, no submission scores) is named in the page, never an
error. `build_report(cfg)` is what training and submit.py call when they finish.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from src.config import (
    Config,
    ConfigError,
    config_digest,
    dump_config,
    load_config,
    load_saved_config,
)
from src.io_utils import atomic_path, atomic_write_text, read_json, run_main
from src.leaderboard import POST_FILE as POSTPROCESS_FILE
from src.leaderboard import code_version, record_run, tuned_scores
from src.metrics import per_query_ap
from src.scoring import collect_fold_scores, summarise

# Every figure the report can make; a rebuild removes the ones it could not make this time,
# so a stale figure never sits beside a page that says its data is missing.
FIGURES = {
    "training_curves.png": "Training curves",
    "roc.png": "ROC curves per fold",
    "similarity_hist.png": "Positive vs negative pair similarities",
    "ap_per_identity.png": "AP per identity",
    "worst_queries.png": "Worst queries",
}
# Bars and table rows for identities: beyond this the chart is unreadable; the worst are kept.
MAX_IDENTITIES_SHOWN = 60
MAX_IDENTITY_TABLE_ROWS = 20
# Long side of a retrieval-strip thumbnail in pixels (enough to tell rosettes apart).
THUMB_PX = 160
# Points kept per ROC curve: a fold of 400 images has 80k pairs; the eye needs far fewer.
ROC_POINTS = 2000
# The zoomed ROC panel's right edge: where runs whose AUCs are all near 1 still differ.
ROC_ZOOM_FPR = 0.1
HIST_BINS = 40


# --------------------------------------------------------------------------- pure numbers

def cosine_matrix(emb_n: np.ndarray) -> np.ndarray:
    """L2-normalised (N, D) embeddings -> (N, N) float64 cosine similarity."""
    emb = np.asarray(emb_n, dtype=np.float64)
    return emb @ emb.T


def pair_similarities(sim: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric (N, N) similarity -> its values for the unordered pairs i < j, split into
    (same identity, different identity)."""
    labels = np.asarray(labels)
    upper = np.triu_indices(len(labels), k=1)
    same = labels[upper[0]] == labels[upper[1]]
    values = np.asarray(sim)[upper]
    return values[same], values[~same]


def roc_points(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1). The trapezoid area under
    it equals the Mann-Whitney AUC with ties counted one half (`metrics.pair_roc_auc`)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    # Tied scores pass a threshold together: keep only the last index of each tie group.
    last = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    tpr = np.cumsum(is_pos)[last] / pos.size
    fpr = np.cumsum(~is_pos)[last] / neg.size
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def thin_curve(x: np.ndarray, y: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` evenly spread samples of a curve, both ends kept."""
    if len(x) <= points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[keep], y[keep]


def identity_ap_rows(ap_q: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Per-query AP (N,) and identities (N,) of out-of-fold images (all folds together) ->
    one row per identity {identity, ap (mean over its scored queries; NaN if none), images,
    queries}, lowest AP first, unscored identities last."""
    ap_q, labels = np.asarray(ap_q, dtype=np.float64), np.asarray(labels).astype(str)
    rows = []
    for identity in np.unique(labels):
        mine = ap_q[labels == identity]
        scored = mine[~np.isnan(mine)]
        rows.append({"identity": str(identity), "images": int(mine.size),
                     "queries": int(scored.size),
                     "ap": float(scored.mean()) if scored.size else float("nan")})
    rows.sort(key=lambda r: (math.isnan(r["ap"]), r["ap"], r["identity"]))
    return rows


def worst_query_order(ap_q: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` lowest-AP queries (NaN, queries without a positive, left out);
    ties in input order."""
    ap_q = np.asarray(ap_q, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(ap_q))
    return valid[np.argsort(ap_q[valid], kind="stable")][:max(n, 0)]


def top_k_gallery(sim_q: np.ndarray, query: int, k: int) -> np.ndarray:
    """Indices of the `k` most similar images to `query` from its similarity row (N,), the
    query itself left out, most similar first."""
    order = np.argsort(-np.asarray(sim_q, dtype=np.float64), kind="stable")
    return order[order != query][:max(k, 0)]


# --------------------------------------------------------------------------- reading the run

@dataclass
class FoldData:
    """What one fold folder holds; None for each missing file."""

    name: str                      # "0", "1", ... or "full"
    directory: Path
    metrics: dict | None = None
    log: pd.DataFrame | None = None
    embeddings: np.ndarray | None = None
    labels: np.ndarray | None = None
    filenames: np.ndarray | None = None
    unfinished: bool = False       # checkpoint.pt present: training under way or stopped

    @property
    def number(self) -> int | None:
        return int(self.name) if self.name.isdigit() else None


@dataclass
class ExperimentData:
    exp_dir: Path
    folds: list[FoldData]
    oof: dict | None
    oof_source: str
    postprocess: dict | None
    submissions: list[tuple[str, dict]]
    config_text: str
    config_source: str
    exp_cfg: Config
    missing: list[str] = field(default_factory=list)


def _fold_dirs(exp_dir: Path) -> list[Path]:
    numbered = sorted((p for p in exp_dir.glob("fold[0-9]*")
                       if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    full = exp_dir / "fold_full"
    return [*numbered, *([full] if full.is_dir() else [])]


def read_json_part(path: Path, missing: list[str]) -> dict | None:
    """A JSON object file's contents; None when absent, or when unreadable (a note added):
    a half-finished or hand-edited file must not stop the report."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        missing.append(f"{path}: unreadable ({exc}); left out")
        return None
    if not isinstance(data, dict):
        missing.append(f"{path}: expected a JSON object, got {type(data).__name__}; left out")
        return None
    return data


def read_fold(directory: Path, missing: list[str]) -> FoldData:
    """A fold folder's files; each one absent or unreadable adds a line to `missing`."""
    name = "full" if directory.name == "fold_full" else directory.name[4:]
    fold = FoldData(name=name, directory=directory,
                    unfinished=(directory / "checkpoint.pt").is_file())
    label = f"fold {name}"
    fold.metrics = read_json_part(directory / "metrics.json", missing)
    if not (directory / "metrics.json").is_file():
        state = "training under way or stopped" if fold.unfinished else "not finished"
        missing.append(f"{label}: no metrics.json ({state})")
    log_path = directory / "log.csv"
    if log_path.is_file():
        try:
            fold.log = pd.read_csv(log_path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            missing.append(f"{label}: {log_path.name} unreadable ({exc}); no training curves")
    else:
        missing.append(f"{label}: no log.csv; no training curves")
    npz_path = directory / "val_embeddings.npz"
    if npz_path.is_file():
        try:
            with np.load(npz_path, allow_pickle=False) as data:
                embeddings, labels = data["embeddings"], data["labels"].astype(str)
                filenames = (data["filenames"].astype(str) if "filenames" in data.files
                             else np.array([f"image {i}" for i in range(len(labels))]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            missing.append(f"{label}: {npz_path.name} unreadable ({exc}); its ROC curve, "
                           "histogram, per-identity AP and strips are left out")
        else:
            fold.embeddings, fold.labels, fold.filenames = embeddings, labels, filenames
    elif fold.number is not None:
        missing.append(f"{label}: no val_embeddings.npz; its ROC curve, similarity histogram, "
                       "per-identity AP and retrieval strips are left out")
    return fold


def _submission_scores(cfg: Config, exp_dir: Path, missing: list[str]) -> list[tuple[str, dict]]:
    """(file name, contents) of every `*.scores.json` of the experiment (submit.py writes one
    per submission file where the test has labels), submission.scores.json first."""
    paths = sorted(exp_dir.glob("*.scores.json"),
                   key=lambda p: (p.name != "submission.scores.json", p.name))
    if cfg.submit.file:
        elsewhere = Path(f"{Path(cfg.submit.file).with_suffix('')}.scores.json")
        if elsewhere.is_file() and elsewhere.resolve() not in {p.resolve() for p in paths}:
            paths.append(elsewhere)
    found = [(p.name if p.parent == exp_dir else str(p), read_json_part(p, missing))
             for p in paths]
    return [(name, scores) for name, scores in found if scores is not None]


def _experiment_config(cfg: Config, exp_dir: Path, missing: list[str]) -> tuple[str, str, Config]:
    """(YAML text, where it came from, resolved config) of the config that produced the run."""
    saved = exp_dir / "config.yaml"
    if not saved.is_file():
        missing.append("config.yaml: the experiment saved no config; the page shows this "
                       "command's config")
        return dump_config(cfg), "this command's config (the experiment saved none)", cfg
    text = saved.read_text()
    try:
        return text, str(saved), load_saved_config(saved)
    except ConfigError as exc:
        # Saved under older defaults: the text is still what produced it.
        missing.append(f"{saved}: does not load under today's defaults ({exc}); image settings "
                       "and digest come from this command's config")
        return text, str(saved), cfg


def _scores_from_embeddings(exp_dir: Path, missing: list[str]) -> list[dict]:
    """src.scoring's per-fold rows, for a run whose oof_scores.json is not (yet) written."""
    if not exp_dir.is_dir():
        return []
    try:
        return collect_fold_scores(exp_dir)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        missing.append(f"{exp_dir}: fold files unreadable for scoring ({exc})")
        return []


def read_experiment(cfg: Config) -> ExperimentData:
    """Everything of `output/<exp>/` the report uses; what is missing is listed, not raised."""
    exp_dir = Path(cfg.output_dir) / cfg.exp
    missing: list[str] = []
    if not exp_dir.is_dir():
        missing.append(f"{exp_dir}: no such experiment folder; nothing has run yet")
    config_text, config_source, exp_cfg = _experiment_config(cfg, exp_dir, missing)
    folds = [read_fold(d, missing) for d in _fold_dirs(exp_dir)]
    if not folds:
        missing.append("no fold folders (fold<k>/): no training results")

    oof = read_json_part(exp_dir / "oof_scores.json", missing)
    oof_source = "oof_scores.json" if oof else ""
    if oof is None:
        rows = _scores_from_embeddings(exp_dir, missing)
        if rows:
            oof = summarise(rows)
            oof_source = "computed from val_embeddings.npz (no oof_scores.json)"
        missing.append("oof_scores.json absent or unreadable (python -m src.scoring exp=NAME "
                       "writes it)" + ("; scores computed from the folds' embeddings"
                                       if rows else ""))

    postprocess = read_json_part(exp_dir / POSTPROCESS_FILE, missing)
    if postprocess is None:
        missing.append(f"{POSTPROCESS_FILE} absent: no post-processed figures")
    elif tuned_scores(postprocess) is None:
        missing.append(f"{POSTPROCESS_FILE} has no 'tuned' step: no post-processed figures")

    submissions = _submission_scores(cfg, exp_dir, missing) if exp_dir.is_dir() else []
    if not submissions:
        missing.append("no submission scores (submission.scores.json: submit.py writes it where "
                       "test_labels.csv exists): no local test score")
    return ExperimentData(exp_dir=exp_dir, folds=folds, oof=oof, oof_source=oof_source,
                          postprocess=postprocess, submissions=submissions,
                          config_text=config_text, config_source=config_source,
                          exp_cfg=exp_cfg, missing=missing)


# --------------------------------------------------------------------------- images

def image_finder(roots: Sequence[str | Path]) -> tuple[Callable[[str], Path | None], Path | None]:
    """(name -> image file or None, the data folder used): the first of `roots` that is a
    folder, searched like src.data resolves train.csv names (a bare name anywhere beneath)."""
    root = next((Path(r) for r in roots if r and Path(r).is_dir()), None)
    if root is None:
        return (lambda name: None), None
    index: dict[str, list[Path]] | None = None

    def find(name: str) -> Path | None:
        nonlocal index
        if Path(name).parent != Path(".") and (root / name).is_file():
            return root / name
        if index is None:
            # src.data brings torch with it; a report that shows no strip never needs it.
            from src.data import index_images
            index = index_images(root)
        found = index.get(Path(name).name, [])
        return found[0] if len(found) == 1 else None

    return find, root


def thumbnail(path: Path | None, cfg: Config, size: int = THUMB_PX) -> np.ndarray | None:
    """(h, w, 3) uint8 of the image as the model saw it (the config's alpha mode), long side
    `size`; None for a missing or unreadable file (the strip shows a placeholder)."""
    if path is None:
        return None
    from PIL import Image

    from src.data import apply_alpha, to_rgba

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size * 4, size * 4))  # JPEG decodes at a fraction of full size
            rgb = apply_alpha(to_rgba(img), cfg.data.alpha, cfg.data.crop_margin,
                              tuple(cfg.data.fill))
    except (OSError, SyntaxError, ValueError):
        return None
    small = Image.fromarray(np.ascontiguousarray(rgb))
    small.thumbnail((size, size))
    return np.asarray(small)


def letterbox(image: np.ndarray, size: int, fill: int = 255) -> np.ndarray:
    """(h, w, 3) with h, w <= size -> (size, size, 3), the image centred: every cell of a strip
    gets the same frame whatever the photo's shape."""
    h, w = image.shape[:2]
    out = np.full((size, size, 3), fill, np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = image[:size, :size, :3]
    return out


# --------------------------------------------------------------------------- figures

def _figure(width: float, height: float):
    # A bare Figure (no pyplot): no global state, no GUI backend, safe in worker processes.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]]) -> bytes:
    """One ROC curve per fold: (fold, fpr, tpr, auc); beside it the low false-positive end,
    where runs with AUCs near 1 differ."""
    fig = _figure(10, 4.8)
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
    return _png(fig)


def plot_similarity_histograms(
        per_fold: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """Per fold, densities of same-identity vs different-identity pair cosine similarity."""
    cols = min(len(per_fold), 3)
    rows = math.ceil(len(per_fold) / cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
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
    return _png(fig)


def plot_identity_ap(rows: Sequence[dict]) -> bytes:
    """Sorted bars of AP per identity (worst at the top, image count beside each) and AP
    against image count: rare identities are where scores fall."""
    import matplotlib

    scored = [r for r in rows if not math.isnan(r["ap"])]
    shown = scored[:MAX_IDENTITIES_SHOWN]
    fig = _figure(11, max(3.0, 0.22 * len(shown) + 1.2))
    bar_ax, scatter_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    counts = np.array([r["images"] for r in scored])
    norm = matplotlib.colors.Normalize(vmin=counts.min(), vmax=max(counts.max(), counts.min() + 1))
    cmap = matplotlib.colormaps["viridis"]
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
    return _png(fig)


def plot_training_curves(logs: Sequence[tuple[str, pd.DataFrame]]) -> bytes:
    """Loss, learning rate and validation mAP / pair AUC per epoch, one line per fold."""
    fig = _figure(10, 6.5)
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
    return _png(fig)


def plot_retrieval_strips(strips: Sequence[dict],
                          thumbs: dict[str, np.ndarray | None]) -> bytes:
    """One row per query: the query (blue frame), then its top-k, green frame = same identity,
    red = wrong; a grey placeholder where an image file is missing."""
    k = max((len(s["hits"]) for s in strips), default=0)
    fig = _figure(1.45 * (k + 1), 1.9 * len(strips))
    axes = np.atleast_2d(fig.subplots(len(strips), k + 1, squeeze=False))
    for row, strip in zip(axes, strips, strict=True):
        cells = [(strip["query"], "tab:blue",
                  f"query, fold {strip['fold']}\n{strip['identity']}\nAP {strip['ap']:.3f}")]
        cells += [(hit["filename"], "tab:green" if hit["right"] else "tab:red",
                   f"#{rank} {'right' if hit['right'] else 'wrong'}\n{hit['identity']}\n"
                   f"sim {hit['sim']:.3f}") for rank, hit in enumerate(strip["hits"], 1)]
        for ax, (name, colour, title) in zip(row, cells, strict=False):
            image = thumbs.get(name)
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
        for ax in row[len(cells):]:
            ax.set_visible(False)
    return _png(fig)


# --------------------------------------------------------------------------- analysis

@dataclass
class Analysis:
    figures: dict[str, bytes]
    identity_rows: list[dict]
    strips: list[dict]
    data_root: Path | None


@dataclass
class FoldScores:
    """One embedded fold's similarity matrix and per-query AP, computed once."""

    fold: FoldData
    sim: np.ndarray   # (N, N) cosine
    ap: np.ndarray    # (N,) per-query AP; NaN where the query has no other image of its own


def retrieval_strips(scored: Sequence[FoldScores], n_queries: int, k: int) -> list[dict]:
    """The `n_queries` lowest-AP out-of-fold queries (all folds together), each with its
    top-k inside its own fold (a fold's model scores only its own validation images)."""
    entries = [(s, q) for s in scored for q in range(len(s.ap))]
    all_ap = np.concatenate([s.ap for s in scored]) if scored else np.array([])
    strips = []
    for i in worst_query_order(all_ap, n_queries):
        s, q = entries[i]
        labels, names = s.fold.labels, s.fold.filenames
        hits = [{"filename": str(names[g]), "identity": str(labels[g]),
                 "sim": float(s.sim[q, g]), "right": bool(labels[g] == labels[q])}
                for g in top_k_gallery(s.sim[q], q, k)]
        strips.append({"fold": s.fold.name, "query": str(names[q]),
                       "identity": str(labels[q]), "ap": float(s.ap[q]),
                       "positives": int((labels == labels[q]).sum() - 1), "hits": hits})
    return strips


def analyse(cfg: Config, data: ExperimentData) -> Analysis:
    """Figures and tables from the run's files; each part needs only its own inputs."""
    figures: dict[str, bytes] = {}
    logs = [(f.name, f.log) for f in data.folds if f.log is not None and len(f.log)]
    if logs:
        figures["training_curves.png"] = plot_training_curves(logs)

    scored = []
    for fold in data.folds:
        if fold.embeddings is not None and fold.number is not None:
            sim = cosine_matrix(fold.embeddings)
            scored.append(FoldScores(fold, sim, per_query_ap(sim, fold.labels)))
    curves, hists = [], []
    for s in scored:
        pos, neg = pair_similarities(s.sim, s.fold.labels)
        fpr, tpr = roc_points(pos, neg)
        # No positive or no negative pair: AUC is undefined, as in src.metrics.
        auc = float(np.trapezoid(tpr, fpr)) if pos.size and neg.size else float("nan")
        curves.append((s.fold.name, fpr, tpr, auc))
        hists.append((s.fold.name, pos, neg))
    if curves:
        figures["roc.png"] = plot_roc(curves)
        figures["similarity_hist.png"] = plot_similarity_histograms(hists)

    identity_rows: list[dict] = []
    if scored:
        identity_rows = identity_ap_rows(np.concatenate([s.ap for s in scored]),
                                         np.concatenate([s.fold.labels for s in scored]))
        if any(not math.isnan(r["ap"]) for r in identity_rows):
            figures["ap_per_identity.png"] = plot_identity_ap(identity_rows)

    strips = retrieval_strips(scored, cfg.report.worst_queries, cfg.report.top_k)
    find, root = image_finder([cfg.data.dir, data.exp_cfg.data.dir])
    if strips:
        names = {s["query"] for s in strips} | {h["filename"] for s in strips for h in s["hits"]}
        thumbs = {name: thumbnail(find(name), data.exp_cfg) for name in sorted(names)}
        lost = sorted(name for name, image in thumbs.items() if image is None)
        if root is None:
            data.missing.append(f"data folder not found ({cfg.data.dir}): the retrieval strips "
                                "show placeholders")
        elif lost:
            shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            data.missing.append(f"{len(lost)} strip image(s) not found or unreadable beneath "
                                f"{root}: {shown}")
        figures["worst_queries.png"] = plot_retrieval_strips(strips, thumbs)
    return Analysis(figures=figures, identity_rows=identity_rows, strips=strips,
                    data_root=root)


# --------------------------------------------------------------------------- tables

def fmt(value: object, digits: int = 4) -> str:
    """A metric as text; blank inputs (None, NaN) as `n/a`."""
    if value is None:
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if math.isnan(number) else f"{number:.{digits}f}"


Table = tuple[list[str], list[list[str]]]


def score_table(data: ExperimentData) -> Table:
    """Per fold and mean: pair AUC and mAP, raw (oof_scores.json) and post-processed (the
    postprocess.json step "tuned")."""
    tuned = tuned_scores(data.postprocess) if data.postprocess else None
    post = {str(p.get("fold")): p for p in (tuned or {}).get("per_fold", [])}
    header = ["fold", "images", "identities", "pair AUC", "mAP", "pair AUC, post-processed",
              "mAP, post-processed"]
    rows = []
    for fold in (data.oof or {}).get("folds", []):
        p = post.get(str(fold["fold"]), {})
        rows.append([str(fold["fold"]), str(fold.get("images", "")),
                     str(fold.get("identities", "")), fmt(fold.get("pair_auc")),
                     fmt(fold.get("map")), fmt(p.get("pair_auc")), fmt(p.get("map"))])
    if data.oof:
        mean = data.oof.get("mean", {})
        rows.append(["mean", "", "", fmt(mean.get("pair_auc")), fmt(mean.get("map")),
                     fmt((tuned or {}).get("pair_auc")), fmt((tuned or {}).get("map"))])
        base = data.oof.get("untrained_mean")
        if base:
            rows.append(["untrained (epoch 0)", "", "", fmt(base.get("pair_auc")),
                         fmt(base.get("map")), "", ""])
    return header, rows


def kind_table(data: ExperimentData) -> Table | None:
    by_kind = (data.oof or {}).get("by_kind")
    if not by_kind:
        return None
    header = ["retrieval embedding (mean of folds)", "pair AUC", "mAP",
              "before training: pair AUC", "mAP"]
    rows = [[kind, fmt(e.get("pair_auc")), fmt(e.get("map")),
             fmt(e.get("untrained", {}).get("pair_auc")), fmt(e.get("untrained", {}).get("map"))]
            for kind, e in by_kind.items()]
    return header, rows


def cv_test_table(data: ExperimentData) -> Table:
    """CV next to the local test: out-of-fold raw and post-processed, then each scored
    submission with its gap to the raw out-of-fold mAP."""
    header = ["source", "mAP", "pair AUC", "mAP gap to OOF raw"]
    oof = (data.oof or {}).get("mean", {})
    rows = [["out of fold, raw (mean over folds)", fmt(oof.get("map")),
             fmt(oof.get("pair_auc")), ""]]
    tuned = tuned_scores(data.postprocess) if data.postprocess else None
    if tuned:
        rows.append(["out of fold, post-processed (tuned)", fmt(tuned.get("map")),
                     fmt(tuned.get("pair_auc")), ""])
    for name, scores in data.submissions:
        test = scores.get("test") or {}
        folds = ",".join(str(f) for f in scores.get("folds", []))
        gap = ""
        if test.get("map") is not None and oof.get("map") is not None:
            gap = f"{float(test['map']) - float(oof['map']):+.4f}"
        rows.append([f"local test: {name} (folds {folds})", fmt(test.get("map")),
                     fmt(test.get("pair_auc")), gap])
    return header, rows


def postprocess_table(postprocess: dict) -> Table:
    steps = postprocess.get("steps", [])
    folds = sorted({str(p.get("fold")) for s in steps for p in s.get("per_fold", [])},
                   key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    header = ["step", "settings", "mAP", "pair AUC", "kept", *(f"fold {f} mAP" for f in folds)]
    rows = []
    for step in steps:
        per = {str(p.get("fold")): p for p in step.get("per_fold", [])}
        kept = step.get("kept")
        if step.get("skipped"):
            settings = "skipped" + (f": {step['why']}" if step.get("why") else "")
        else:
            settings = step.get("description") or json.dumps(step.get("settings", {}),
                                                              sort_keys=True)
        rows.append([str(step.get("step", "")), settings,
                     "" if step.get("skipped") else fmt(step.get("map")),
                     "" if step.get("skipped") else fmt(step.get("pair_auc")),
                     "" if kept is None else ("yes" if kept else "no"),
                     *("" if step.get("skipped") else fmt(per.get(f, {}).get("map"))
                       for f in folds)])
    return header, rows


def fold_facts_table(folds: Sequence[FoldData]) -> Table:
    header = ["fold", "status", "epochs run", "best epoch", "weights kept", "retrieval",
              "seconds", "device", "processes", "training digest", "log rows"]
    rows = []
    for fold in folds:
        m = fold.metrics or {}
        status = "finished" if fold.metrics else (
            "unfinished (checkpoint.pt)" if fold.unfinished else "no metrics.json")
        rows.append([fold.name, status, *(str(m.get(key, "")) for key in
                                          ("epochs_run", "best_epoch", "weights", "retrieval",
                                           "seconds", "device", "processes",
                                           "training_digest")),
                     "" if fold.log is None else str(len(fold.log))])
    return header, rows


def identity_table(rows: Sequence[dict]) -> Table:
    header = ["identity", "AP", "images (out of fold)", "queries scored"]
    return header, [[r["identity"], fmt(r["ap"]), str(r["images"]), str(r["queries"])]
                    for r in rows[:MAX_IDENTITY_TABLE_ROWS]]


def strip_table(strips: Sequence[dict]) -> Table:
    header = ["fold", "query", "identity", "AP", "other images of it", "top-k (identity)"]
    rows = [[s["fold"], s["query"], s["identity"], fmt(s["ap"], 3), str(s["positives"]),
             " ".join(f"{h['identity']}{'+' if h['right'] else '-'}" for h in s["hits"])]
            for s in strips]
    return header, rows


# --------------------------------------------------------------------------- rendering

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.missing { background: #fff4e0; border-left: 4px solid #e0a030; padding: 0.4em 0.8em; }
.meta { color: #555; }
"""


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(table: Table) -> str:
    header, rows = table

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def _html_figure(figures: dict[str, bytes], name: str, missing_text: str) -> str:
    if name not in figures:
        return f'<p class="missing">{html.escape(missing_text)}</p>'
    encoded = base64.b64encode(figures[name]).decode("ascii")
    return (f'<figure><img alt="{html.escape(FIGURES[name])}" '
            f'src="data:image/png;base64,{encoded}"><figcaption>{html.escape(name)}'
            "</figcaption></figure>")


@dataclass
class Sections:
    """The report's content, rendered once as HTML and once as Markdown."""

    title: str
    meta: list[tuple[str, str]]
    missing: list[str]
    scores: Table
    kinds: Table | None
    cv_test: Table
    postprocess: Table | None
    postprocess_note: str
    facts: Table
    identities: Table
    identity_count: int
    strips: Table
    config_text: str
    config_source: str


def make_sections(cfg: Config, data: ExperimentData, analysis: Analysis) -> Sections:
    version = code_version()
    dirty = {True: "yes (uncommitted changes)", False: "no", None: "unknown"}[version["dirty"]]
    meta = [("experiment", cfg.exp), ("folder", str(data.exp_dir)),
            ("built", datetime.now(timezone.utc).isoformat(timespec="seconds")),
            ("config digest", config_digest(data.exp_cfg)),
            ("code version (git commit, at build time)", version["commit"]),
            ("dirty", dirty),
            ("scores from", data.oof_source or "n/a"),
            ("data folder (strips)", str(analysis.data_root) if analysis.data_root else "n/a")]
    post, note = None, ""
    if data.postprocess:
        post = postprocess_table(data.postprocess)
        pp = data.postprocess
        chosen = pp.get("description") or json.dumps(pp.get("settings", {}), sort_keys=True)
        folds = pp.get("folds")
        note = (f"tuned on {pp.get('metric', '?')}"
                + (f" over folds {', '.join(str(f) for f in folds)}" if folds else "")
                + f"; chosen: {chosen}")
    return Sections(
        title=f"Experiment report: {cfg.exp}", meta=meta, missing=list(data.missing),
        scores=score_table(data), kinds=kind_table(data), cv_test=cv_test_table(data),
        postprocess=post, postprocess_note=note, facts=fold_facts_table(data.folds),
        identities=identity_table(analysis.identity_rows),
        identity_count=len(analysis.identity_rows), strips=strip_table(analysis.strips),
        config_text=data.config_text, config_source=data.config_source)


def _identity_caption(s: Sections) -> str:
    shown = len(s.identities[1])
    if shown < s.identity_count:
        return f"Worst {shown} of {s.identity_count} identities:"
    return f"All {shown} identities, worst first:"


def render_html(s: Sections, figures: dict[str, bytes], top_k: int) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{esc(s.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(s.title)}</h1>",
             '<table class="meta">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                                              for k, v in s.meta) + "</table>"]
    parts.append('<h2 id="missing">Missing parts</h2>')
    if s.missing:
        parts.append('<ul class="missing">' + "".join(f"<li>{esc(m)}</li>" for m in s.missing)
                     + "</ul>")
    else:
        parts.append("<p>None: every part of the report had its files.</p>")
    parts += ['<h2 id="scores">Out-of-fold scores</h2>',
              "<p>Pair ROC-AUC and identity-balanced mAP over each fold's validation images, "
              "scored with that fold's model; post-processed = the postprocess.json step "
              "&quot;tuned&quot;.</p>", _html_table(s.scores)]
    if s.kinds:
        parts.append(_html_table(s.kinds))
    parts += ['<h2 id="cv-test">CV next to the local test</h2>', _html_table(s.cv_test)]
    parts.append('<h2 id="postprocess">Post-processing steps</h2>')
    if s.postprocess:
        parts += [f"<p>{esc(s.postprocess_note)}</p>", _html_table(s.postprocess)]
    else:
        parts.append(f'<p class="missing">{POSTPROCESS_FILE} absent: no post-processing '
                     "measured.</p>")
    parts += ['<h2 id="training">Training</h2>', _html_table(s.facts),
              _html_figure(figures, "training_curves.png", "No log.csv in any fold.")]
    parts += ['<h2 id="roc">ROC curves and pair similarities</h2>',
              _html_figure(figures, "roc.png", "No fold has val_embeddings.npz."),
              _html_figure(figures, "similarity_hist.png", "No fold has val_embeddings.npz.")]
    parts += ['<h2 id="identities">AP per identity</h2>',
              _html_figure(figures, "ap_per_identity.png", "No scored identity.")]
    if s.identities[1]:
        parts += [f"<p>{esc(_identity_caption(s))}</p>", _html_table(s.identities)]
    parts += ['<h2 id="worst-queries">Worst queries</h2>',
              f"<p>Lowest-AP out-of-fold queries with their top {top_k} inside their fold: "
              "blue frame = query, green = same identity (right), red = wrong.</p>",
              _html_figure(figures, "worst_queries.png", "No fold has val_embeddings.npz.")]
    if s.strips[1]:
        parts.append(_html_table(s.strips))
    parts += ['<h2 id="config">Config</h2>', f"<p>{esc(s.config_source)}</p>",
              f"<pre>{esc(s.config_text)}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"


def render_markdown(s: Sections, figures: dict[str, bytes], top_k: int) -> str:
    lines = [f"# {s.title}", ""]
    lines += [f"- {k}: {v}" for k, v in s.meta]
    lines += ["", "## Missing parts", ""]
    lines += [f"- {m}" for m in s.missing] or ["None."]
    lines += ["", "## Out-of-fold scores", "", _md_table(s.scores), ""]
    if s.kinds:
        lines += [_md_table(s.kinds), ""]
    lines += ["## CV next to the local test", "", _md_table(s.cv_test), ""]
    if s.postprocess:
        lines += ["## Post-processing steps", "", s.postprocess_note, "",
                  _md_table(s.postprocess), ""]
    lines += ["## Training", "", _md_table(s.facts), ""]
    if s.identities[1]:
        lines += ["## AP per identity", "",
                  _identity_caption(s), "",
                  _md_table(s.identities), ""]
    if s.strips[1]:
        lines += ["## Worst queries", "", f"Top {top_k} inside the query's fold; `+` right, "
                  "`-` wrong.", "", _md_table(s.strips), ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{FIGURES[name]}]({name})" for name in FIGURES if name in figures]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points

def report_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.exp / "report"


def build_report(cfg: Config) -> Path:
    """Write `<output_dir>/<exp>/report/` (index.html, summary.md, *.png) from whatever the
    experiment holds; returns the index.html path."""
    data = read_experiment(cfg)
    analysis = analyse(cfg, data)
    sections = make_sections(cfg, data, analysis)
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in analysis.figures.items():
        with atomic_path(out / name, suffix=".png") as tmp:
            tmp.write_bytes(png)
    for name in FIGURES:
        if name not in analysis.figures and (out / name).is_file():
            (out / name).unlink()
    atomic_write_text(out / "summary.md",
                      render_markdown(sections, analysis.figures, cfg.report.top_k))
    index = out / "index.html"
    atomic_write_text(index, render_html(sections, analysis.figures, cfg.report.top_k))
    return index


def after_run(cfg: Config, event: str, test_scores: dict | None = None,
              wall_s: float | None = None, device: str | None = None,
              report: bool = True, post: str | None = None,
              folds: list | None = None) -> None:
    """What training and submit.py do when they finish: a leaderboard row, then the report
    (`report.enabled`). The results are already written; a report that cannot be drawn is
    a warning, never the run's failure."""
    try:
        record_run(cfg, event, test_scores, wall_s, device, post, folds)
    except Exception as exc:  # noqa: BLE001 - the run's results are written already
        print(f"warning: no leaderboard row for {cfg.exp!r}: {type(exc).__name__}: {exc}")
    if report and cfg.report.enabled:
        try:
            index = build_report(cfg)
            print(f"report: {index}")
        except Exception as exc:  # noqa: BLE001 - any plotting failure must not lose the run
            print(f"warning: report for {cfg.exp!r} not built: {type(exc).__name__}: {exc}")


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    index = build_report(cfg)
    print(f"wrote {index} (and summary.md, figures) for experiment {cfg.exp!r}")


if __name__ == "__main__":
    run_main(main)
