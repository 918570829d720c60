"""identify.html: one self-contained page (no network, no scripts) a field biologist opens.

At the top, what the calibration promises (its rates out of fold) and the photos that could
not be read. Then one card per photo: the photo, the verdict (the named individual or "new
individual", with its probability), and beside it each candidate individual's closest gallery
photo with its probability and similarity. With `identify.local`, the photo and each
candidate's gallery photo side by side with a line per matched keypoint. Every picture is
inline (a data URI); a gallery photo shown for several photos is embedded once, as a CSS
class.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaguar_reid.identify.calibration import percent
from jaguar_reid.identify.identifier import (
    ERROR,
    KNOWN,
    Candidate,
    Identification,
    Identifier,
)

PHOTO_SIDE = 224  # px, the photo's thumbnail
MATCH_HEIGHT = 160  # px, each image of a keypoint panel
MAX_MATCH_LINES = 80  # more lines hide the coat they are drawn on
JPEG_QUALITY = 82

_CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1280px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; } .promise { background: #eef5ff;
  border-left: 4px solid #3070c0; padding: 0.5em 0.9em; } .errors { background: #fff4e0;
  border-left: 4px solid #e0a030; padding: 0.4em 0.9em; }
.card { display: flex; gap: 1em; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em;
  margin: 0.8em 0; align-items: flex-start; }
.photo { width: 240px; flex: none; } .photo img { width: 224px; height: auto;
  max-height: 300px; object-fit: contain; }
.name { font-size: 0.8em; color: #555; word-break: break-all; }
.verdict { font-weight: bold; padding: 0.15em 0.5em; border-radius: 4px; display: inline-block;
  margin: 0.3em 0; } .known { background: #d8f0dc; color: #145a22; }
.new { background: #ffe6cc; color: #8a4200; } .error { background: #fbdcdc; color: #8a1c1c; }
.cands { display: flex; flex-wrap: wrap; gap: 0.6em; }
.cand { width: 140px; font-size: 0.85em; } .cand.top { font-weight: bold; }
.thumb { width: 128px; height: 128px; background-size: contain; background-repeat: no-repeat;
  background-position: center; border: 1px solid #ccc; background-color: #f4f4f4; }
.matches { display: flex; flex-wrap: wrap; gap: 0.5em; margin-top: 0.6em; }
.matches figure { margin: 0; font-size: 0.8em; color: #444; }
.matches img { height: 160px; border: 1px solid #ddd; display: block; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc;
  padding: 0.2em 0.6em; text-align: right; } td:first-child { text-align: left; }
"""


@dataclass(frozen=True)
class PageFacts:
    """What the page says about the run beside the photos."""

    title: str
    seconds: float | None = None  # wall clock of the identification


def jpeg_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb[..., :3])).save(out, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def photo_uri(path: Path, identifier: Identifier) -> str | None:
    from jaguar_reid.reporting.reading import thumbnail

    small = thumbnail(path, identifier.cfg, PHOTO_SIDE)
    return None if small is None else jpeg_uri(small)


def match_uri(photo: Path, gallery: Path, cand: Candidate) -> str | None:
    """The two images side by side, a line per matched keypoint (pixels of the files)."""
    from PIL import Image, ImageDraw

    from jaguar_reid.data.images import ImageError, read_rgba

    try:
        left, right = read_rgba(photo), read_rgba(gallery)
    except ImageError:
        return None
    scales = [MATCH_HEIGHT / im.shape[0] for im in (left, right)]
    sized = [Image.fromarray(im[..., :3]).resize((max(1, round(im.shape[1] * s)), MATCH_HEIGHT))
             for im, s in zip((left, right), scales, strict=True)]
    canvas = Image.new("RGB", (sized[0].width + sized[1].width, MATCH_HEIGHT), "white")
    canvas.paste(sized[0], (0, 0))
    canvas.paste(sized[1], (sized[0].width, 0))
    draw = ImageDraw.Draw(canvas)
    ours, theirs = cand.matches
    for (x0, y0), (x1, y1) in list(zip(ours, theirs, strict=True))[:MAX_MATCH_LINES]:
        draw.line([(x0 * scales[0], y0 * scales[0]),
                   (x1 * scales[1] + sized[0].width, y1 * scales[1])], fill=(30, 200, 60))
    return jpeg_uri(np.asarray(canvas))


def _thumb_classes(records: Sequence[Identification], identifier: Identifier) -> str:
    """A CSS class per gallery photo shown, its thumbnail as the background."""
    shown = sorted({c.gallery_index for r in records for c in r.candidates})
    rules = []
    for i in shown:
        data = identifier.gallery.thumbs[i]
        if data:
            uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
            rules.append(f".g{i} {{ background-image: url({uri}); }}")
    return "\n".join(rules)


def _verdict(record: Identification) -> str:
    if record.verdict == ERROR:
        return '<span class="verdict error">not read</span>'
    p_new = "" if record.new_probability is None else \
        f" &middot; P(new) {percent(record.new_probability)}"
    if record.verdict == KNOWN:
        return f'<span class="verdict known">{html.escape(str(record.identity))}</span>{p_new}'
    return f'<span class="verdict new">new individual</span>{p_new}'


def _candidate(cand: Candidate, top: bool) -> str:
    inliers = "" if cand.inliers is None else f"<br>{cand.inliers} keypoint matches"
    return (f'<div class="cand{" top" if top else ""}"><div class="thumb g{cand.gallery_index}" '
            f'title="{html.escape(cand.gallery_photo)}"></div>{html.escape(cand.identity)}<br>'
            f"P {percent(cand.probability)} &middot; sim {cand.similarity:.3f}{inliers}</div>")


def _card(record: Identification, identifier: Identifier) -> str:
    uri = photo_uri(record.photo, identifier) if record.verdict != ERROR else None
    image = f'<img src="{uri}" alt="">' if uri else ""
    left = (f'<div class="photo">{image}<div class="name">{html.escape(str(record.photo))}'
            f"</div>{_verdict(record)}</div>")
    if record.verdict == ERROR:
        return f'<div class="card">{left}<div>{html.escape(str(record.error))}</div></div>'
    cands = "".join(_candidate(c, i == 0 and record.verdict == KNOWN)
                    for i, c in enumerate(record.candidates))
    panels = []
    for cand in record.candidates:
        gallery = identifier.gallery_file(cand.gallery_index) if cand.inliers else None
        drawn = match_uri(record.photo, gallery, cand) if gallery else None
        if drawn:
            panels.append(f'<figure><img src="{drawn}" alt=""><figcaption>photo | '
                          f"{html.escape(cand.identity)}: {cand.inliers} keypoint matches"
                          "</figcaption></figure>")
    matches = f'<div class="matches">{"".join(panels)}</div>' if panels else ""
    return f'<div class="card">{left}<div><div class="cands">{cands}</div>{matches}</div></div>'


def _header(records: Sequence[Identification], identifier: Identifier,
            facts: PageFacts) -> list[str]:
    cal = identifier.calibration
    counts = {v: sum(r.verdict == v for r in records) for v in (KNOWN, "new", ERROR)}
    timing = "" if facts.seconds is None or not records else \
        f"; {facts.seconds / len(records):.2f} s per photo"
    probability = ("P = the probability that the photo shows that individual (new individuals "
                   f"at a share of {identifier.cfg.identify.new_share:g})"
                   if identifier.probabilities_with_new else
                   "P = the probability of that individual if the photo shows a known one "
                   "(P(new) is unmeasured: no new-individual queries at calibration)")
    out = [f"<h1>{html.escape(facts.title)}</h1>",
           f'<p class="meta">{len(records)} photos: {counts[KNOWN]} known, {counts["new"]} '
           f"new individual, {counts[ERROR]} not read{timing}. Gallery: "
           f"{len(identifier.gallery)} photos of {len(identifier.classes)} individuals. "
           f"{probability}.</p>",
           f'<p class="promise">A photo is named when its known-vs-new score reaches the '
           f"threshold chosen for identify.{cal.target}={cal.target_value:g} (not where P(new) "
           f"is 50%): {html.escape(cal.promise())}."
           + "".join(f"<br>Unmeasured: {html.escape(u)}." for u in cal.unmeasured) + "</p>"]
    bad = [r for r in records if r.verdict == ERROR]
    if bad:
        out.append('<div class="errors"><b>Not read:</b><br>'
                   + "<br>".join(html.escape(str(r.error)) for r in bad) + "</div>")
    return out


def render_page(records: Sequence[Identification], identifier: Identifier,
                facts: PageFacts) -> str:
    body = _header(records, identifier, facts) + [_card(r, identifier) for r in records]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(facts.title)}</title><style>{_CSS}\n"
            f"{_thumb_classes(records, identifier)}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
