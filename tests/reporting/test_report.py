"""Experiment report: pure helpers, and the page built from a tiny fake experiment (files in
the formats training, scoring, post-processing and submit.py write; no model is trained)."""

import base64
import io
import json
import re
import shutil
import subprocess
from html import unescape as html_unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaguar_reid import layout
from jaguar_reid.config import load_config
from jaguar_reid.io_utils import atomic_write_json, read_json
from jaguar_reid.reporting.analysis import (
    cosine_matrix,
    identity_ap_rows,
    pair_similarities,
    roc_points,
    top_k_gallery,
    worst_query_order,
)
from jaguar_reid.reporting.page import build_report, main
from jaguar_reid.reporting.plots import FIGURES, plot_roc, plot_similarity_histograms
from jaguar_reid.reporting.runs import code_version
from jaguar_reid.retrieval.metrics import (
    identity_balanced_map,
    pair_roc_auc,
    per_identity_ap,
    per_query_ap,
)
from jaguar_reid.retrieval.oof import score_experiment
from jaguar_reid.training.checkpoint import LOG_FIELDS  # torch: the report imports it already
from tests.helpers import fake_experiment

IDS_PER_FOLD, IMAGES_PER_ID = 3, 4


# --------------------------------------------------------------------------- pure helpers

def test_roc_area_equals_pair_auc_with_ties():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 4)
    emb = rng.normal(size=(20, 6))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim = np.round(cosine_matrix(emb), 1)  # coarse values: many tied pairs
    pos, neg = pair_similarities(sim, labels)
    assert pos.size == 5 * 6 and neg.size == 20 * 19 // 2 - 30
    fpr, tpr = roc_points(pos, neg)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # the trapezoid rule, written out
    assert area == pytest.approx(pair_roc_auc(sim, labels), abs=1e-12)


def test_worst_queries_and_top_k():
    ap = np.array([0.5, np.nan, 0.2, 0.5, 1.0])
    assert worst_query_order(ap, 3).tolist() == [2, 0, 3]
    assert worst_query_order(ap, 0).tolist() == []
    sim_row = np.array([9.0, 0.1, 0.7, 0.3])
    assert top_k_gallery(sim_row, 0, 2).tolist() == [2, 3]  # the query itself is left out


def test_identity_rows_match_per_identity_ap():
    rng = np.random.default_rng(2)
    labels = np.array(["a", "a", "a", "b", "b", "c"])
    sim = cosine_matrix(rng.normal(size=(6, 4)))
    rows = identity_ap_rows(per_query_ap(sim, labels), labels)
    expected = per_identity_ap(sim, labels)
    assert {r["identity"]: r["ap"] for r in rows[:2]} == pytest.approx(expected)
    assert [r["ap"] for r in rows[:2]] == sorted(expected.values())
    assert rows[-1]["identity"] == "c" and np.isnan(rows[-1]["ap"])  # one image: unscored last
    assert {r["identity"]: r["images"] for r in rows} == {"a": 3, "b": 2, "c": 1}


def test_figures_survive_degenerate_folds():
    # A fold whose identities have one image each has no positive pair; one of tied values.
    no_pos, tied = (np.array([]), np.array([0.2, 0.3])), (np.array([0.5]), np.array([0.5]))
    png = plot_similarity_histograms([("0", *no_pos), ("1", *tied)])
    fpr, tpr = roc_points(*no_pos)
    png_roc = plot_roc([("0", fpr, tpr, float("nan"))])
    for data in (png, png_roc):
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "PNG" and img.width > 0


# --------------------------------------------------------------------------- fake experiment

def _write_image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path)


def _log_text() -> str:
    """A log.csv as training writes it: 4 epochs, the first without a loss."""
    lines = [",".join(LOG_FIELDS)]
    for epoch in range(4):
        row = {"epoch": epoch, "loss": "nan" if epoch == 0 else 3.0 / epoch,
               "lr": 1e-3 * (epoch > 0), "pair_auc": 0.8 + 0.05 * epoch,
               "map": 0.5 + 0.1 * epoch, "images_per_s": 10.0, "seconds": epoch}
        lines.append(",".join(str(row.get(field, 0.7)) for field in LOG_FIELDS))
    return "\n".join(lines) + "\n"


def submission_scores_path(cfg) -> Path:
    return layout.submission_extra(layout.submission_path(cfg, cfg.exp), layout.SCORES_EXTRA)


def make_experiment(root: Path, folds=(0, 1), log_folds=(0,), extras=True, images=True):
    """output/fake/ with `folds` finished (3 identities x 4 images each), a data folder with
    train.csv and the images, oof_scores.json from the real scorer and, with `extras`,
    postprocess.json and submission.scores.json. Returns the config."""
    rng = np.random.default_rng(0)
    data_dir = root / "data"
    cfg = load_config([f"output_dir={root / 'output'}", "exp=fake", f"data.dir={data_dir}",
                       "report.top_k=3", "report.worst_queries=2"])
    val, rows = {}, []
    for fold in folds:
        labels = np.repeat([f"id{fold}{i}" for i in range(IDS_PER_FOLD)], IMAGES_PER_ID)
        names = np.array([f"img_{fold}_{n}.jpg" for n in range(len(labels))])
        centres = rng.normal(size=(IDS_PER_FOLD, 8))
        emb = np.repeat(centres, IMAGES_PER_ID, axis=0) + rng.normal(size=(len(labels), 8))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        val[fold] = {"embeddings": emb, "neck": emb, "backbone": emb, "both": emb,
                     "filenames": names, "labels": labels}
        if images:
            for name, label in zip(names, labels, strict=True):
                _write_image(data_dir / "train" / name, tuple(int(c) for c in rng.integers(
                    0, 255, 3)))
                rows.append(f"{name},{label}")
    if images:
        layout.data_files(cfg).train.write_text(
            "filename,ground_truth\n" + "\n".join(rows) + "\n")
    exp_dir = fake_experiment(
        cfg, folds, weights=None, val=val.__getitem__, exp_config=True,
        metrics=lambda fold: {"weights": "last", "best_epoch": 2, "epochs_run": 3,
                              "processes": 1, "retrieval": "neck", "device": "cpu",
                              "seconds": 1.5, "training_digest": f"digest{fold}"},
        log=lambda fold: _log_text() if fold in log_folds else None)
    score_experiment(exp_dir, quiet=True)
    if extras:
        atomic_write_json(layout.work_dir(cfg) / layout.POST_CHOICE, {
            "metric": "map", "settings": {"qe": {"k": 2}},
            "steps": [
                {"step": "raw", "settings": {}, "map": 0.41111, "pair_auc": 0.81111,
                 "kept": True, "per_fold": [{"fold": 0, "map": 0.40001, "pair_auc": 0.8},
                                            {"fold": 1, "map": 0.42221, "pair_auc": 0.82}]},
                {"step": "qe", "settings": {"k": 2}, "map": 0.45561, "pair_auc": 0.83333,
                 "kept": True, "per_fold": [], "description": "query expansion k=2"},
                {"step": "closed", "skipped": True, "why": "grouped folds"},
                {"step": "tuned", "settings": {"qe": {"k": 2}}, "map": 0.46789,
                 "pair_auc": 0.84321, "kept": True,
                 "per_fold": [{"fold": 0, "map": 0.45671, "pair_auc": 0.83456},
                              {"fold": 1, "map": 0.47907, "pair_auc": 0.85186}]},
            ]})
        atomic_write_json(submission_scores_path(cfg), {
            "submission": str(layout.submission_path(cfg, cfg.exp)), "rows": 10,
            "folds": [0, 1], "test": {"map": 0.37531, "pair_auc": 0.79135},
            "oof": read_json(layout.read_path(cfg, layout.OOF_SCORES))["mean"]})
    return cfg


class _Page(HTMLParser):
    """Every <img src>, every src/href value, the ids of the sections, the table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.links, self.ids, self.cells = [], [], [], []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "td":
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def parse_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def decoded_images(page: _Page) -> list[Image.Image]:
    images = []
    prefix = "data:image/png;base64,"
    for src in page.images:
        assert src.startswith(prefix), f"image not embedded as base64 PNG: {src[:60]}"
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))) as img:
            img.load()
            assert img.format == "PNG" and img.width > 0 and img.height > 0
            images.append(img)
    return images


def worst_query(exp_dir: Path, folds) -> tuple[str, float]:
    """The lowest-AP query over the folds, computed here from the embeddings themselves."""
    worst = ("", 2.0)
    for fold in folds:
        with np.load(layout.fold_dir(exp_dir, fold) / layout.VAL_EMBEDDINGS) as data:
            emb, labels, names = data["embeddings"], data["labels"], data["filenames"]
        ap = per_query_ap(emb @ emb.T, labels)
        q = int(np.nanargmin(ap))
        if ap[q] < worst[1]:
            worst = (str(names[q]), float(ap[q]))
    return worst


def test_report_holds_every_section_with_its_numbers(tmp_path):
    cfg = make_experiment(tmp_path)
    cfg.tune.local = True  # local verification in use: its match pictures are drawn too
    exp_dir = layout.model_dir(cfg)
    worst_name, worst_ap = worst_query(exp_dir, (0, 1))
    (tmp_path / "data" / "train" / worst_name).unlink()  # the strip shows a placeholder

    index = build_report(cfg)

    assert index == layout.report_dir(cfg) / layout.REPORT_INDEX
    html = index.read_text()
    summary = (index.parent / layout.REPORT_SUMMARY).read_text()
    page = parse_page(index)
    for section in ("missing", "scores", "cv-test", "postprocess", "training", "roc",
                    "identities", "worst-queries", "local-matches", "config"):
        assert section in page.ids

    oof = read_json(layout.read_path(cfg, layout.OOF_SCORES))
    for fold in oof["folds"]:
        for text in (f"{fold['map']:.4f}", f"{fold['pair_auc']:.4f}"):
            assert text in page.cells and f" {text} " in summary
    for text in (f"{oof['mean']['map']:.4f}", f"{oof['mean']['pair_auc']:.4f}"):
        assert text in page.cells and f" {text} " in summary
    post = read_json(layout.read_path(cfg, layout.POST_CHOICE))
    tuned = post["steps"][-1]
    for fold in tuned["per_fold"]:
        assert f"{fold['map']:.4f}" in page.cells and f"{fold['pair_auc']:.4f}" in page.cells
    assert {"0.4679", "0.8432", "0.4556"} <= set(page.cells)  # tuned mean, qe step
    steps = ["raw", "qe", "closed", "tuned"]
    assert [c for c in page.cells if c in steps] == steps
    assert {"query expansion k=2", "skipped: grouped folds"} <= set(page.cells)
    test = read_json(submission_scores_path(cfg))["test"]
    assert f"{test['map']:.4f}" in page.cells and f" {test['map']:.4f} " in summary
    assert f"{test['map'] - oof['mean']['map']:+.4f}" in page.cells  # CV next to the test

    assert code_version()["commit"] in html and "exp: fake" in html
    assert "fold 1: no log.csv" in html and "fold 1: no log.csv" in summary
    assert "postprocess.json absent" not in html
    assert f"strip image(s) not found or unreadable beneath {tmp_path / 'data'}: " \
           f"{worst_name}" in html
    assert worst_name in page.cells and f"{worst_ap:.3f}" in page.cells
    assert "All 6 identities, worst first" in html and "digest1" in page.cells

    images = decoded_images(page)
    assert len(images) == len(FIGURES)
    for name in FIGURES:
        png = (index.parent / name).read_bytes()
        assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page.images
        assert f"]({name})" in summary
    strip = images[list(FIGURES).index("worst_queries.png")]
    assert strip.width > strip.height  # 2 queries x (1 + top_k 3) cells
    assert not [link for link in page.links if link.startswith(("http://", "https://", "//"))]


def test_report_builds_from_whatever_exists(tmp_path, capsys):
    cfg = make_experiment(tmp_path, folds=(0,), log_folds=(), extras=False, images=False)
    exp_dir = layout.model_dir(cfg)
    (layout.work_dir(cfg) / layout.OOF_SCORES).unlink()
    (layout.work_dir(cfg) / layout.OOF_SCORES_MD).unlink()
    stale = layout.report_dir(cfg) / "training_curves.png"
    stale.parent.mkdir()
    stale.write_bytes(b"an old figure")

    main([f"output_dir={cfg.output_dir}", "exp=fake", f"data.dir={cfg.data.dir}"])

    assert "wrote" in capsys.readouterr().out
    index = layout.report_dir(cfg) / layout.REPORT_INDEX
    html = index.read_text()
    for note in ("postprocess.json absent", "no submission scores", "oof_scores.json absent",
                 "fold 0: no log.csv", "data folder not found"):
        assert note in html
    assert not stale.exists()  # no log this time: the old curves are not left beside the page
    # no log: no curves; local verification not in use: no match pictures
    assert len(decoded_images(parse_page(index))) == len(FIGURES) - 2
    with np.load(layout.fold_dir(exp_dir, 0) / layout.VAL_EMBEDDINGS) as data:
        emb, labels = data["embeddings"], data["labels"]
    assert f"{identity_balanced_map(emb @ emb.T, labels):.4f}" in parse_page(index).cells


def test_report_of_an_empty_experiment_states_it(tmp_path):
    cfg = load_config([f"output_dir={tmp_path}", "exp=nothing", f"data.dir={tmp_path}/none"])
    index = build_report(cfg)
    html = index.read_text()
    assert "no such experiment folder" in html and "no fold folders" in html
    assert parse_page(index).images == []


# --------------------------------------------------------------------------- in a browser

CHROMIUM = shutil.which("chromium")  # Debian's package; .ci/run installs it where it can
WINDOW_WIDTH = 1400  # wider than the page's 1200 px body: figures are shown at their own size
# Put at the top of a copy of the page: a content security policy that lets it load nothing
# but data: images and its own inline style, a record of every load that policy refused,
# and, once the page has loaded, a <pre id="probe"> holding what the browser made of it: the
# page's height, each <img>'s decoded size and place on the screen, every resource fetched.
PROBE = """<meta http-equiv="Content-Security-Policy" content="default-src 'none'; \
img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"><script>
var refused = [];
document.addEventListener("securitypolicyviolation", function (e) {
  refused.push(e.blockedURI || e.violatedDirective); });
window.addEventListener("load", function () {
  var probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    height: document.documentElement.scrollHeight,
    images: Array.from(document.images, function (img) {
      var box = img.getBoundingClientRect();
      return {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
              left: box.left + img.clientLeft, top: box.top + img.clientTop,
              shown_width: img.clientWidth, shown_height: img.clientHeight}; }),
    fetched: performance.getEntriesByType("resource").map(function (r) { return r.name; }),
    refused: refused});
  document.body.appendChild(probe);
});
</script>"""
# A reference out of the page in its source: a URL attribute, a CSS url() or @import that
# names a scheme other than data:, or a network path (//host/...).
EXTERNAL_REF = re.compile(r"""(?:\b(?:src|href|srcset|poster|action|data)\s*=\s*["']?|"""
                          r"""url\(\s*["']?|@import\s+["']?)\s*(?!data:)(?:[a-z][a-z0-9+.-]*:|//)""",
                          re.IGNORECASE)


def open_in_chromium(page: Path, profile: Path, shot: Path, height: int) -> dict:
    """`page` in headless Chromium with no way out to any network (every host name resolves
    to nothing, every connection goes to a closed local port): its probe's record, and a
    screenshot of the top `height` pixels at `shot`."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic", f"--user-data-dir={profile}",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         "--force-device-scale-factor=1", "--hide-scrollbars",
         f"--window-size={WINDOW_WIDTH},{height}", f"--screenshot={shot}", "--dump-dom",
         page.as_uri()],
        check=True, timeout=90, capture_output=True, text=True)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"the probe did not run; chromium said:\n{done.stderr[-2000:]}"
    return json.loads(html_unescape(found.group(1)))


def shown_like(shot: Image.Image, image: dict, figure: Image.Image) -> tuple[float, float]:
    """How close the screenshot's pixels where an <img> is shown are to the figure itself:
    (correlation, mean absolute difference out of 255), the best within a pixel of the
    reported place (the browser snaps fractional positions)."""
    size = (image["shown_width"], image["shown_height"])
    reference = np.asarray(figure.convert("RGB").resize(size) if figure.size != size
                           else figure.convert("RGB"), float)
    best = (-1.0, 255.0)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            left, top = round(image["left"]) + dx, round(image["top"]) + dy
            crop = np.asarray(shot.crop((left, top, left + size[0], top + size[1])), float)
            if crop.std() == 0:
                continue  # one flat colour: nothing drawn there
            corr = float(np.corrcoef(crop.mean(axis=2).ravel(),
                                     reference.mean(axis=2).ravel())[0, 1])
            best = max(best, (corr, float(np.abs(crop - reference).mean())))
    return best


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs it)")
def test_page_renders_in_headless_chromium(tmp_path):
    """The report as a person sees it in a real browser, offline: every figure decodes at its
    own size and is painted where the page puts it, nothing is fetched, nothing is blank."""
    cfg = make_experiment(tmp_path)
    cfg.tune.local = True  # every figure, the local matches' included
    index = build_report(cfg)
    source = index.read_text()
    figures = decoded_images(parse_page(index))
    assert len(figures) == len(FIGURES)
    outside = [m.group(0) for m in EXTERNAL_REF.finditer(source)]
    assert not outside, f"the page refers outside itself: {outside}"
    assert source.count("<head>") == 1
    page = index.with_name("probed.html")  # beside the original: the same relative paths
    page.write_text(source.replace("<head>", "<head>" + PROBE, 1))
    shot = tmp_path / "screenshot.png"

    height = 6000  # the figures lie well within it; the page is opened again if not
    probe = open_in_chromium(page, tmp_path / "profile", shot, height)
    if max((im["top"] + im["shown_height"] for im in probe["images"]), default=0) > height:
        height = min(int(probe["height"]), 16000)
        probe = open_in_chromium(page, tmp_path / "profile", shot, height)

    assert probe["fetched"] == [] and probe["refused"] == []  # offline and self-contained
    assert len(probe["images"]) == len(figures)
    with Image.open(shot) as img:
        screen = img.convert("RGB")
    assert screen.size == (WINDOW_WIDTH, height)
    pixels = np.asarray(screen.convert("L"), float)
    assert pixels.std() > 10 and len(screen.getcolors(1 << 24)) > 100, f"blank page? {shot}"
    for n, (image, figure) in enumerate(zip(probe["images"], figures, strict=True)):
        assert image["complete"] and (image["width"], image["height"]) == figure.size, n
        assert image["top"] + image["shown_height"] <= height, n
        corr, diff = shown_like(screen, image, figure)
        assert corr > 0.95 and diff < 6, f"figure {n} is not painted as decoded: {shot}"


def test_half_written_files_are_named_not_raised(tmp_path):
    cfg = make_experiment(tmp_path, folds=(0,), log_folds=(), extras=False, images=False)
    raw = {"step": "raw", "settings": {}, "map": 0.5, "pair_auc": 0.9, "kept": True}
    (layout.work_dir(cfg) / layout.POST_CHOICE).write_text(
        json.dumps({"metric": "map", "settings": {}, "steps": [raw]}))
    submission_scores_path(cfg).write_text('{"test": ')
    html = build_report(cfg).read_text()
    assert "no &#x27;tuned&#x27; step" in html and "<td>raw</td>" in html
    assert "submission.scores.json: unreadable" in html and "no submission scores" in html
