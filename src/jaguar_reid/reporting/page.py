"""Experiment report: `python -m jaguar_reid.report exp=NAME [config=...] [key=value ...]`.

One self-contained page per experiment for picking models: `output/<exp>/report/index.html`
(figures embedded as base64 PNG, no network, no scripts), the same figures as PNG files and a
Markdown summary beside it. It holds the out-of-fold scores per fold, raw and post-processed,
next to the local test score; ROC curves and similarity histograms; AP per identity with image
counts; retrieval strips of the worst queries; the training curves; the config and the code
version. It is built from whatever the experiment holds: a part whose files are missing (a
fold without a log, no postprocess.json, no submission scores) is named in the page, never an
error. `build_report(cfg)` is what training and submit.py call when they finish.

The steps live beside this module, each importing only the ones before it: `reading` (the
experiment's files), `analysis` (the numbers), `plots` (the figures), `tables` and `render`
(the page as HTML and Markdown). This module holds only the entry points.
"""

from __future__ import annotations

from pathlib import Path

from jaguar_reid import layout
from jaguar_reid.config import Config, load_config
from jaguar_reid.io_utils import atomic_path, atomic_write_text
from jaguar_reid.reporting.analysis import analyse
from jaguar_reid.reporting.plots import FIGURES, make_figures
from jaguar_reid.reporting.reading import read_experiment
from jaguar_reid.reporting.render import make_sections, render_html, render_markdown
from jaguar_reid.reporting.runs import record_run


def _write_figures(out: Path, figures: dict[str, bytes]) -> None:
    """The PNG files beside the page; a figure not made this time is removed, not left stale."""
    for name, png in figures.items():
        with atomic_path(out / name, suffix=".png") as tmp:
            tmp.write_bytes(png)
    for name in FIGURES:
        if name not in figures and (out / name).is_file():
            (out / name).unlink()


def build_report(cfg: Config) -> Path:
    """Write `<output_dir>/<exp>/report/` (index.html, summary.md, *.png) from whatever the
    experiment holds; returns the index.html path."""
    data = read_experiment(cfg)
    analysis = analyse(cfg, data)
    figures = make_figures(analysis)
    sections = make_sections(cfg, data, analysis)
    out = layout.report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _write_figures(out, figures)
    atomic_write_text(out / layout.REPORT_SUMMARY,
                      render_markdown(sections, figures, cfg.report.top_k))
    index = out / layout.REPORT_INDEX
    atomic_write_text(index, render_html(sections, figures, cfg.report.top_k))
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
