"""The report's tables as text: (header, rows) of already formatted cells, built from what
`reading` read and `analysis` derived; `render` lays them out as HTML and Markdown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from jaguar_reid.reporting.reading import ExperimentData, FoldData
from jaguar_reid.reporting.runs import tuned_scores
from jaguar_reid.retrieval.floor import FLOOR_NAME

# Table rows for identities: beyond this the table is unreadable; the worst are kept.
MAX_IDENTITY_TABLE_ROWS = 20

Table = tuple[list[str], list[list[str]]]


def fmt(value: object, digits: int = 4) -> str:
    """A metric as text; blank inputs (None, NaN) as `n/a`."""
    if value is None:
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if math.isnan(number) else f"{number:.{digits}f}"


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
        for label, key in (("untrained (epoch 0)", "untrained_mean"),
                           (FLOOR_NAME, "floor_mean")):
            base = data.oof.get(key)
            if base:
                rows.append([label, "", "", fmt(base.get("pair_auc")), fmt(base.get("map")),
                             "", ""])
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
    floor = (data.oof or {}).get("floor_mean")
    if floor:
        rows.append([f"out of fold, {FLOOR_NAME}", fmt(floor.get("map")),
                     fmt(floor.get("pair_auc")), ""])
    for name, scores in data.submissions:
        test = scores.get("test") or {}
        folds = ",".join(str(f) for f in scores.get("folds", []))
        gap = ""
        if test.get("map") is not None and oof.get("map") is not None:
            gap = f"{float(test['map']) - float(oof['map']):+.4f}"
        rows.append([f"local test: {name} (folds {folds})", fmt(test.get("map")),
                     fmt(test.get("pair_auc")), gap])
        floor = scores.get("floor")
        if floor:
            rows.append([f"local test: {FLOOR_NAME}", fmt(floor.get("map")),
                         fmt(floor.get("pair_auc")), ""])
    return header, rows


def _step_row(step: dict, folds: Sequence[str]) -> list[str]:
    """One post-processing step: its settings (or why it was skipped), scores, kept, per fold."""
    per = {str(p.get("fold")): p for p in step.get("per_fold", [])}
    kept = step.get("kept")
    skipped = bool(step.get("skipped"))
    if skipped:
        settings = "skipped" + (f": {step['why']}" if step.get("why") else "")
    else:
        settings = step.get("description") or json.dumps(step.get("settings", {}),
                                                          sort_keys=True)
    return [str(step.get("step", "")), settings,
            "" if skipped else fmt(step.get("map")),
            "" if skipped else fmt(step.get("pair_auc")),
            "" if kept is None else ("yes" if kept else "no"),
            *("" if skipped else fmt(per.get(f, {}).get("map")) for f in folds)]


def postprocess_table(postprocess: dict) -> Table:
    steps = postprocess.get("steps", [])
    folds = sorted({str(p.get("fold")) for s in steps for p in s.get("per_fold", [])},
                   key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    header = ["step", "settings", "mAP", "pair AUC", "kept", *(f"fold {f} mAP" for f in folds)]
    return header, [_step_row(step, folds) for step in steps]


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
