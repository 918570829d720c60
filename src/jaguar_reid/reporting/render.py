"""The report's page: its sections gathered once (`make_sections`), then rendered as a
self-contained HTML page (figures embedded as base64 PNG, no network, no scripts) and as a
Markdown summary.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from jaguar_reid import layout
from jaguar_reid.config import Config, config_digest
from jaguar_reid.reporting.analysis import Analysis
from jaguar_reid.reporting.plots import FIGURES
from jaguar_reid.reporting.reading import ExperimentData
from jaguar_reid.reporting.runs import code_version
from jaguar_reid.reporting.tables import (
    Table,
    cv_test_table,
    fold_facts_table,
    identity_table,
    kind_table,
    postprocess_table,
    score_table,
    strip_table,
)
from jaguar_reid.text import markdown_table

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


# --------------------------------------------------------------------------- the content

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


def _meta(cfg: Config, data: ExperimentData, analysis: Analysis) -> list[tuple[str, str]]:
    version = code_version()
    dirty = {True: "yes (uncommitted changes)", False: "no", None: "unknown"}[version["dirty"]]
    return [("experiment", cfg.exp), ("folder", str(data.exp_dir)),
            ("built", datetime.now(timezone.utc).isoformat(timespec="seconds")),
            ("config digest", config_digest(data.exp_cfg)),
            ("code version (git commit, at build time)", version["commit"]),
            ("dirty", dirty),
            ("scores from", data.oof_source or "n/a"),
            ("data folder (strips)", str(analysis.data_root) if analysis.data_root else "n/a")]


def _postprocess_note(pp: dict) -> str:
    """What the tuning optimised, over which folds, and what it chose."""
    chosen = pp.get("description") or json.dumps(pp.get("settings", {}), sort_keys=True)
    folds = pp.get("folds")
    return (f"tuned on {pp.get('metric', '?')}"
            + (f" over folds {', '.join(str(f) for f in folds)}" if folds else "")
            + f"; chosen: {chosen}")


def make_sections(cfg: Config, data: ExperimentData, analysis: Analysis) -> Sections:
    meta = _meta(cfg, data, analysis)
    post, note = None, ""
    if data.postprocess:
        post = postprocess_table(data.postprocess)
        note = _postprocess_note(data.postprocess)
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


# --------------------------------------------------------------------------- HTML

def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_figure(figures: dict[str, bytes], name: str, missing_text: str) -> str:
    if name not in figures:
        return f'<p class="missing">{html.escape(missing_text)}</p>'
    encoded = base64.b64encode(figures[name]).decode("ascii")
    return (f'<figure><img alt="{html.escape(FIGURES[name])}" '
            f'src="data:image/png;base64,{encoded}"><figcaption>{html.escape(name)}'
            "</figcaption></figure>")


def _html_head(s: Sections) -> list[str]:
    """The page's head, title, facts table and the list of missing parts."""
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
    return parts


def render_html(s: Sections, figures: dict[str, bytes], top_k: int) -> str:
    esc = html.escape
    parts = _html_head(s)
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
        parts.append(f'<p class="missing">{layout.POST_CHOICE} absent: no post-processing '
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
    if "local_matches.png" in figures:
        parts += ['<h2 id="local-matches">Matched keypoints</h2>',
                  "<p>Local verification of the worst queries' top candidates: a line per "
                  "keypoint match that survived the ratio test and the geometric check. "
                  "Matches on the background or on the silhouette are what the mask and the "
                  "calibration have to overcome.</p>",
                  _html_figure(figures, "local_matches.png", "")]
    parts += ['<h2 id="config">Config</h2>', f"<p>{esc(s.config_source)}</p>",
              f"<pre>{esc(s.config_text)}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- Markdown

def render_markdown(s: Sections, figures: dict[str, bytes], top_k: int) -> str:
    lines = [f"# {s.title}", ""]
    lines += [f"- {k}: {v}" for k, v in s.meta]
    lines += ["", "## Missing parts", ""]
    lines += [f"- {m}" for m in s.missing] or ["None."]
    lines += ["", "## Out-of-fold scores", "", markdown_table(*s.scores), ""]
    if s.kinds:
        lines += [markdown_table(*s.kinds), ""]
    lines += ["## CV next to the local test", "", markdown_table(*s.cv_test), ""]
    if s.postprocess:
        lines += ["## Post-processing steps", "", s.postprocess_note, "",
                  markdown_table(*s.postprocess), ""]
    lines += ["## Training", "", markdown_table(*s.facts), ""]
    if s.identities[1]:
        lines += ["## AP per identity", "",
                  _identity_caption(s), "",
                  markdown_table(*s.identities), ""]
    if s.strips[1]:
        lines += ["## Worst queries", "", f"Top {top_k} inside the query's fold; `+` right, "
                  "`-` wrong.", "", markdown_table(*s.strips), ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{FIGURES[name]}]({name})" for name in FIGURES if name in figures]
        lines.append("")
    return "\n".join(lines)
