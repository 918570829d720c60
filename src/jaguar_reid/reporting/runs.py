"""Leaderboard of runs: `output/leaderboard.csv`, one row per finished training or submission.

`record_run` appends a row at the end of `train.sh` and `submit.py`;
`python -m jaguar_reid.leaderboard
[report.rank_by=COLUMN]` prints the runs ranked by one column. Several runs may finish at the
same moment (fold-parallel launches, two terminals), so every append holds an exclusive lock on
`leaderboard.csv.lock` while it reads the file, adds its row and renames a complete new file
over the old one: no row is ever lost and a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jaguar_reid import layout
from jaguar_reid.config import Config, config_digest, load_config, load_saved_config
from jaguar_reid.io_utils import UserInputError, atomic_path, file_lock, read_json

COLUMNS = ("time", "event", "experiment", "config_digest", "commit", "backbone", "img_size",
           "folds", "oof_map", "oof_pair_auc", "oof_map_post", "oof_pair_auc_post",
           "oof_floor_map", "test_map", "test_pair_auc", "test_floor_map", "wall_s", "device",
           "post")
EVENTS = ("train", "submit")
TUNED_STEP = "tuned"  # the step of a tuned choice (postprocess.json) with the chosen scores
# Metric columns keep more digits than any table shows: rows are compared long after the run.
_METRIC_DIGITS = 6


# --------------------------------------------------------------------------- code version

def code_version(repo: str | Path = layout.REPO_ROOT) -> dict[str, Any]:
    """{"commit": full hash or "unknown", "dirty": bool, or None when not a git checkout}."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                                text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        # No git, not a checkout, or a checkout git refuses (ownership): the run still counts.
        return {"commit": "unknown", "dirty": None}
    return {"commit": head or "unknown", "dirty": bool(status.strip())}


def short_commit(version: dict[str, Any]) -> str:
    """`cc6b1da1b2c3` or `cc6b1da1b2c3-dirty` (git describe's mark), `unknown` outside git."""
    commit = version["commit"]
    if commit == "unknown":
        return commit
    return commit[:12] + ("-dirty" if version.get("dirty") else "")


# --------------------------------------------------------------------------- one row

def _metric(value: Any) -> str:
    if value is None:
        return ""
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.{_METRIC_DIGITS}f}"


def tuned_scores(postprocess: dict) -> dict | None:
    """The "tuned" step of a postprocess.json (map, pair_auc, per_fold), or None without one."""
    for step in postprocess.get("steps", []):
        if step.get("step") == TUNED_STEP:
            return step
    return None


def run_row(cfg: Config, event: str, test_scores: dict | None = None,
            wall_s: float | None = None, device: str | None = None,
            post: str | None = None, folds: list | None = None) -> dict[str, str]:
    """The leaderboard row of one finished event of experiment `cfg.exp`, as CSV strings;
    files of the experiment that do not exist leave their columns blank."""
    if event not in EVENTS:
        raise ValueError(f"event must be one of {', '.join(EVENTS)}; got {event!r}")
    oof_path = layout.read_path(cfg, layout.OOF_SCORES)
    post_path = layout.read_path(cfg, layout.POST_CHOICE)
    oof_doc = read_json(oof_path) if oof_path.is_file() else {}
    oof, oof_floor = oof_doc.get("mean", {}), oof_doc.get("floor_mean") or {}
    tuned = tuned_scores(read_json(post_path)) if post_path.is_file() else None
    tuned = tuned or {}
    test = test_scores or {}
    # The experiments' own saved configs (an ensemble is named a+b): a `submit.py exp=X`
    # without config= has only the defaults for the model.
    models = [load_saved_config(p) for p in (layout.model_dir(cfg, name) / layout.RUN_CONFIG
                                             for name in cfg.exp.split("+")) if p.is_file()]
    models = models or [cfg]
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "event": event,
        "experiment": cfg.exp,
        "config_digest": config_digest(cfg),
        "commit": short_commit(code_version()),
        "backbone": "+".join(dict.fromkeys(c.model.backbone for c in models)),
        "img_size": "+".join(dict.fromkeys(str(c.data.img_size) for c in models)),
        "folds": ",".join(map(str, folds if folds is not None else _scored_folds(cfg, oof_doc))),
        "oof_map": _metric(oof.get("map")),
        "oof_pair_auc": _metric(oof.get("pair_auc")),
        "oof_map_post": _metric(tuned.get("map")),
        "oof_pair_auc_post": _metric(tuned.get("pair_auc")),
        "oof_floor_map": _metric(oof_floor.get("map")),
        "test_map": _metric(test.get("map")),
        "test_pair_auc": _metric(test.get("pair_auc")),
        "test_floor_map": _metric((test.get("floor") or {}).get("map")),
        "wall_s": "" if wall_s is None else f"{float(wall_s):.1f}",
        "device": device or "",
        # what a submission applied: the tuned columns above are the experiment's choice,
        # which `post.use_tuned=false` does not use
        "post": post or "",
    }


def _scored_folds(cfg: Config, oof_doc: dict) -> list:
    """A training's folds: those whose scores the row holds (read from the same out-of-fold
    file as its scores: another training of the same experiment may have finished a fold
    since), and `full` when it is trained (it has no validation score)."""
    scored = [entry["fold"] for entry in oof_doc.get("folds", [])]
    full = layout.FULL in layout.finished_folds(layout.model_dir(cfg), full=True)
    return [*scored, *([layout.FULL] if full else [])]


# --------------------------------------------------------------------------- the file

def read_leaderboard(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a leaderboard CSV; a missing file is an empty leaderboard."""
    path = Path(path)
    if not path.is_file():
        return list(COLUMNS), []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [{k: v or "" for k, v in row.items() if k is not None} for row in reader]
        columns = list(reader.fieldnames or COLUMNS)
    return columns, rows


def append_row(path: str | Path, row: dict[str, str]) -> None:
    """Add `row` to the CSV at `path` under the lock, keeping every earlier row and column."""
    path = Path(path)
    with file_lock(path.with_name(path.name + ".lock")):
        columns, rows = read_leaderboard(path)
        # Columns a newer or older version wrote are kept, ours are added at the end.
        columns += [c for c in row if c not in columns]
        rows.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(path) as tmp:
            tmp.write_text(buffer.getvalue())


def record_run(cfg: Config, event: str, test_scores: dict | None = None,
               wall_s: float | None = None, device: str | None = None,
               post: str | None = None, folds: list | None = None) -> dict:
    """Append one row for a finished `event` ("train" or "submit") of `cfg.exp` to
    `<output_dir>/leaderboard.csv`; `test_scores` is submission's {"map", "pair_auc"} on the
    local test labels (None: no labels, blank columns). Returns the row written."""
    row = run_row(cfg, event, test_scores, wall_s, device, post, folds)
    append_row(layout.leaderboard_path(cfg), row)
    return row


# --------------------------------------------------------------------------- ranking

def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _filled(value: str) -> bool:
    return value.strip() != "" and value.strip().lower() != "nan"


def rank_rows(rows: Sequence[dict[str, str]], column: str) -> list[dict[str, str]]:
    """Rows sorted by `column`, highest first; blank (and NaN) values last, in file order.
    Numbers compare as numbers when every filled value of the column is one, else as text."""
    filled = [r for r in rows if _filled(r.get(column, ""))]
    blank = [r for r in rows if not _filled(r.get(column, ""))]
    if all(_number(r[column]) is not None for r in filled):
        filled.sort(key=lambda r: _number(r[column]), reverse=True)
    else:
        filled.sort(key=lambda r: r[column], reverse=True)
    return [*filled, *blank]


def _display(column: str, value: str) -> str:
    # Four digits is what every other table of the project shows; the file keeps six.
    if column.startswith(("oof_", "test_")) and _number(value) is not None:
        return f"{float(value):.4f}"
    return value


def format_leaderboard(rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    """Aligned plain-text table (rank first), numbers right-aligned."""
    header = ["#", *columns]
    body = [[str(i), *(_display(c, row.get(c, "")) for c in columns)]
            for i, row in enumerate(rows, 1)]
    widths = [max(len(line[j]) for line in [header, *body]) for j in range(len(header))]
    numeric = [all(_number(line[j]) is not None or not line[j] for line in body)
               for j in range(len(header))]

    def render(line: list[str]) -> str:
        cells = [cell.rjust(w) if num else cell.ljust(w)
                 for cell, w, num in zip(line, widths, numeric, strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    path = layout.leaderboard_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no leaderboard yet; it gets a row when a training "
                                "(train.sh) or a submission (submit.py) finishes")
    columns, rows = read_leaderboard(path)
    column = cfg.report.rank_by
    if column not in columns:
        raise UserInputError(f"report.rank_by={column!r} is not a column of {path}; choose one "
                             f"of {', '.join(columns)}")
    print(f"{path}: {len(rows)} runs, ranked by {column} (highest first, blanks last)")
    print(format_leaderboard(rank_rows(rows, column), columns))
