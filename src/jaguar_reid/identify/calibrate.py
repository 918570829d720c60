"""`python -m jaguar_reid.identify.calibrate exp=NAME [identify.grouped_exp=G]
[identify.closed_exp=C] [identify.target=max_false_new|min_precision]`: fit, out of fold, what
identification needs, and save it with the experiment.

Known-individual queries are the validation photos of an experiment trained on **closed**
folds (their individuals have training photos), new-individual queries those of one trained on
**grouped** folds (their individuals were never seen); each is scored against its fold's
training photos by that fold's model. An experiment is trained on one strategy, so the other
kind comes from another experiment of the same recipe (`identify.closed_exp`,
`identify.grouped_exp`; `exp` itself fills the one its folds are). Without grouped folds the
new-individual rates stay unmeasured, and the output says so.

Writes into `<output_dir>/<exp>/`, together or not at all: `identify.json` (the fitted
numbers, the threshold and the rates measured at it), `identify.md` (the same to read) and
`identify_gallery.npz` (every training image embedded by each of `exp`'s fold models, with a
thumbnail: what `jaguar_reid.identify` compares new photos with). `export` carries them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from jaguar_reid import layout
from jaguar_reid.commit import commit_together, finish_commits
from jaguar_reid.config import Config, load_config
from jaguar_reid.identify import files
from jaguar_reid.identify.calibration import (
    Calibration,
    CalibrationError,
    KnownQueries,
    fit_decision,
    fit_temperature,
    percent,
    pick_threshold,
    rates_at,
    unmeasured_rates,
)
from jaguar_reid.identify.candidates import (
    decision_features,
    identity_codes,
    identity_scores,
    prototype_scores,
)
from jaguar_reid.identify.gallery import Gallery, build_gallery, fold_images, save_gallery
from jaguar_reid.io_utils import UserInputError, json_text, resolve_device
from jaguar_reid.text import markdown_table


class CalibrateError(UserInputError):
    """Calibration cannot run with these experiments; the message names the key."""


def strategy_of(cfg: Config, exp: str) -> str:
    """The fold strategy an experiment was trained on (its first finished fold's recipe)."""
    from jaguar_reid.retrieval.embedding import fold_config, require_finished_folds

    return fold_config(cfg, exp, require_finished_folds(cfg, exp)[0])[0].folds.strategy


def calibration_experiments(cfg: Config) -> tuple[str, str | None]:
    """(the closed-fold experiment, the grouped-fold one or None), each checked."""
    own = strategy_of(cfg, cfg.exp)
    closed = cfg.identify.closed_exp or (cfg.exp if own == "closed" else "")
    grouped = cfg.identify.grouped_exp or (cfg.exp if own == "grouped" else "")
    if not closed:
        raise CalibrateError(
            f"experiment {cfg.exp!r} is trained on {own} folds, and identify.closed_exp is "
            "empty: known-individual queries come from closed folds; train the same recipe "
            "with folds.strategy=closed and name it identify.closed_exp=NAME")
    for key, exp, want in (("closed_exp", closed, "closed"), ("grouped_exp", grouped, "grouped")):
        if exp and strategy_of(cfg, exp) != want:
            raise CalibrateError(f"key 'identify.{key}': experiment {exp!r} is trained on "
                                 f"{strategy_of(cfg, exp)} folds, not {want}")
    return closed, grouped or None


def fold_queries(cfg: Config, exp: str, fold: int, views: Sequence[str],
                 device: str) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (Q, C) of the fold's validation photos to its training individuals,
    each photo's own individual among them or -1)."""
    images = fold_images(cfg, exp, fold, views, device)
    query, gallery = images.embeddings[images.is_val], images.embeddings[~images.is_val]
    classes, codes = identity_codes(images.labels[~images.is_val])
    if cfg.identify.score == "prototype":
        scores = prototype_scores(query, gallery, codes, len(classes))
    else:
        scores = identity_scores(query.astype(np.float64) @ gallery.T, codes, len(classes))
    labels = images.labels[images.is_val]
    where = np.searchsorted(classes, labels)
    inside = (where < len(classes)) & (classes[np.minimum(where, len(classes) - 1)] == labels)
    return scores, np.where(inside, where, -1)


def _check_split(exp: str, fold: int, known_share: float, strategy: str) -> None:
    """The split read for a fold is the strategy its recipe says (an experiment folder
    without its folds.csv is read with today's folds.file, which may be another's)."""
    if (known_share < 0.5) if strategy == "closed" else (known_share > 0.5):
        raise CalibrateError(
            f"experiment {exp!r} fold {fold}: {100 * known_share:.0f}% of its validation "
            f"photos' individuals have training photos, which is not a {strategy} split; its "
            "folder has no folds.csv of its own: point folds.file at the split it was trained "
            "on")


def recipe_differences(cfg: Config, exps: Sequence[str]) -> list[str]:
    """The recipe keys (beside the split) on which the calibration's experiments differ:
    their queries stand in for each other's models only if they were trained alike."""
    from jaguar_reid.keys import SPECS
    from jaguar_reid.retrieval.embedding import fold_config, require_finished_folds
    from jaguar_reid.schema import RECIPE

    saved = [fold_config(cfg, e, require_finished_folds(cfg, e)[0])[0] for e in exps]
    return [f"{name} ({', '.join(repr(s.get_path(name)) for s in saved)})"
            for name, spec in SPECS.items() if spec.role == RECIPE and
            not name.startswith("folds.") and len({repr(s.get_path(name)) for s in saved}) > 1]


def gather(cfg: Config, closed: str, grouped: str | None, views: Sequence[str],
           device: str) -> tuple[KnownQueries, np.ndarray | None, dict]:
    """The known queries, the new queries' decision features, and where they came from."""
    from jaguar_reid.retrieval.embedding import require_finished_folds

    scores, truth, left_out = [], [], 0
    closed_folds = require_finished_folds(cfg, closed)
    for fold in closed_folds:
        s, t = fold_queries(cfg, closed, fold, views, device)
        _check_split(closed, fold, float(np.mean(t >= 0)), "closed")
        scores.append(s[t >= 0])
        truth.append(t[t >= 0])
        left_out += int((t < 0).sum())
    known = KnownQueries(scores, truth)
    sources = {"closed_exp": closed, "closed_folds": [str(f) for f in closed_folds],
               "known_queries": len(known), "known_left_out": left_out}
    if grouped is None:
        return known, None, sources | {"grouped_exp": None}
    grouped_folds = require_finished_folds(cfg, grouped)
    new = []
    for fold in grouped_folds:
        s, t = fold_queries(cfg, grouped, fold, views, device)
        _check_split(grouped, fold, float(np.mean(t >= 0)), "grouped")
        new.append(decision_features(s[t < 0]))
    new_features = np.concatenate(new)
    return known, new_features, sources | {"grouped_exp": grouped,
                                           "grouped_folds": [str(f) for f in grouped_folds],
                                           "new_queries": len(new_features)}


def fit(cfg: Config, known: KnownQueries, new_features: np.ndarray | None,
        views: Sequence[str], sources: dict) -> Calibration:
    """Every number of the calibration, from the gathered queries."""
    if not len(known):
        raise CalibrateError(f"experiment {sources['closed_exp']!r}: no validation photo whose "
                             "individual has training photos in its fold")
    ident = cfg.identify
    decision = fit_decision(known.features(), new_features)
    known_z = decision.score(known.features())
    new_z = None if new_features is None else decision.score(new_features)
    value = ident.max_false_new if ident.target == "max_false_new" else ident.min_precision
    try:
        threshold = pick_threshold(ident.target, value, known_z, known.right(), new_z,
                                   ident.new_share)
    except CalibrationError as exc:
        raise CalibrateError(str(exc)) from None
    rates = rates_at(threshold, known_z, known.right(), new_z, ident.new_share)
    return Calibration(ident.score, tuple(views), fit_temperature(known), decision, threshold,
                       ident.target, value, ident.new_share, rates,
                       unmeasured_rates(new_z, ident.target), sources)


def rate_rows(cal: Calibration) -> list[list[str]]:
    r = cal.rates
    return [
        ["known individual: top candidate right, no threshold", percent(r.top1)],
        ["known individual: named right", percent(r.known_named_right)],
        ["known individual: named wrong", percent(r.known_named_wrong)],
        ["known individual: called new", percent(r.known_called_new)],
        ["new individual: called new", percent(r.new_called_new)],
        ["new individual: given a known name", percent(r.new_named)],
        [f"named photos right (new individuals {cal.new_share:g} of photos)",
         percent(r.precision)],
        ["named photos right, known individuals only", percent(r.precision_known)],
    ]


def summary_text(cal: Calibration) -> str:
    """The calibration in Markdown (also printed)."""
    src = cal.sources
    target = f"identify.{cal.target}={cal.target_value:g}"
    lines = [f"Target {target}: threshold {cal.threshold:.4f} on the {cal.decision.method} "
             f"score; temperature {cal.temperature:.2f}; views {'+'.join(cal.views)}; "
             f"similarity {cal.score}."
             + (f" Held at 0 (more of it looked less known out of fold): "
                f"{', '.join(cal.decision.clamped)}." if cal.decision.clamped else ""),
             "",
             f"Known-individual queries: {src['known_queries']} validation photos of "
             f"{src['closed_exp']!r} (closed folds {', '.join(src['closed_folds'])})"
             + (f", {src['known_left_out']} left out (their individual had no training photo "
                "in the fold)" if src["known_left_out"] else "") + ".",
             "New-individual queries: " + (
                 f"{src['new_queries']} validation photos of {src['grouped_exp']!r} (grouped "
                 f"folds {', '.join(src['grouped_folds'])})." if src.get("grouped_exp")
                 else "none (no grouped-fold experiment)."),
             "", cal.promise() + ".", "",
             markdown_table(["out of fold, at the threshold", "share"], rate_rows(cal))]
    if cal.unmeasured:
        lines += ["", "Unmeasured:", *(f"- {u}" for u in cal.unmeasured)]
    return "\n".join(lines)


def write_outputs(cfg: Config, cal: Calibration, gallery: Gallery) -> list[Path]:
    """identify.json, identify.md and the gallery into the work folder, together."""
    folder = layout.work_dir(cfg)
    finish_commits(folder, files.COMMIT_NAME)
    text = f"# Identification calibration: {cfg.exp}\n\n{summary_text(cal)}\n"
    writers = {
        folder / files.CALIBRATION: lambda p: p.write_text(json_text(cal.to_dict())),
        folder / files.CALIBRATION_MD: lambda p: p.write_text(text),
        folder / files.GALLERY: lambda p: save_gallery(gallery, p),
    }
    commit_together(writers, files.COMMIT_NAME)
    return list(writers)


def run(cfg: Config) -> Calibration:
    from jaguar_reid.manifest import verify_manifest
    from jaguar_reid.retrieval.embedding import require_finished_folds

    device = resolve_device(cfg.device)
    views = list(dict.fromkeys(cfg.embed.tta))
    closed, grouped = calibration_experiments(cfg)
    for exp in dict.fromkeys([cfg.exp, closed, grouped or cfg.exp]):
        verify_manifest(layout.model_dir(cfg, exp), required=bool(cfg.models)
                        and cfg.models_verify)
    exps = list(dict.fromkeys(e for e in (cfg.exp, closed, grouped) if e))
    differ = recipe_differences(cfg, exps)
    if differ:
        print(f"note: experiments {', '.join(exps)} were trained with other recipes: "
              f"{'; '.join(differ)}; each one's rates stand for the others' only that far")
    known, new_features, sources = gather(cfg, closed, grouped, views, device)
    cal = fit(cfg, known, new_features, views, sources)
    folds = require_finished_folds(cfg, cfg.exp)
    # One id in both files: a reader tells a pair from one run from a mix of two.
    run_id = uuid.uuid4().hex[:16]
    cal = replace(cal, retrieval=cfg.submit.retrieval, run_id=run_id)
    gallery = replace(build_gallery(cfg, cfg.exp, folds, views, device), run_id=run_id)
    written = write_outputs(cfg, cal, gallery)
    print(summary_text(cal))
    print(f"wrote {', '.join(str(p) for p in written)} ({len(gallery)} gallery photos of "
          f"{len(set(gallery.labels))} individuals, fold models {', '.join(gallery.folds)})")
    return cal


def main(argv: list[str]) -> None:
    run(load_config(argv))


if __name__ == "__main__":
    from jaguar_reid.cli import run_step

    run_step("calibrate")
