"""Identification end to end on tiny fake experiments (random untrained fold models, no
training): calibration out of fold, the command and the Python API on the same photos, bad
photos skipped, outputs together, the export carrying the calibration, a gallery added without
retraining, stale or missing calibrations refused in one line."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from jaguar_reid import export, layout
from jaguar_reid.config import load_config
from jaguar_reid.data.splits import keep_with_experiment, load_or_create_folds
from jaguar_reid.identify import Identifier, calibrate, command, files
from jaguar_reid.identify.calibration import Calibration
from jaguar_reid.identify.candidates import decision_features, identity_codes, identity_scores
from jaguar_reid.identify.gallery import GalleryError, read_gallery
from jaguar_reid.identify.identifier import IdentifyError
from jaguar_reid.io_utils import read_json, run_main
from tests.helpers import (
    IDS,
    TINY_ARGS,
    base_args,
    coat_png,
    fake_experiment,
    make_data,
    set_writable,
    snapshot,
    spots,
    tiny_png,
    warp,
)

pytestmark = pytest.mark.slow  # end to end: minutes on 2 CPU cores, no training

CLOSED, GROUPED = "known_ids", "new_ids"


def _args(root: Path, data: Path, exp: str, strategy: str, *extra: str) -> list[str]:
    return [*TINY_ARGS, *base_args(data, root, f"exp={exp}", f"folds.strategy={strategy}",
                                   f"folds.file={root / f'{strategy}.csv'}", *extra)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A closed and a grouped fake experiment (2 folds each, random weights), calibrated."""
    root = tmp_path_factory.mktemp("identify")
    data = make_data(root / "data")
    closed = _args(root, data, CLOSED, "closed")
    grouped = _args(root, data, GROUPED, "grouped")
    for args in (closed, grouped):
        exp_dir = fake_experiment(args, folds=(0, 1), exp_config=True)
        # As training does: the experiment keeps the assignment it was trained on.
        keep_with_experiment(load_or_create_folds(load_config(args)), exp_dir)
    run_main(calibrate.main, [*closed, f"identify.grouped_exp={GROUPED}"])
    photos = root / "photos"
    photos.mkdir()
    for i, name in enumerate(["train_0000.png", "train_0005.png"]):  # two training photos
        shutil.copy(next((data / "train").rglob(name)), photos / f"known_{i}.png")
    tiny_png(photos / "rgba_mask.png", 200)  # a photo with an alpha mask
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(photos / "plain.jpg")  # no alpha
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
    return {"root": root, "data": data, "closed": closed, "grouped": grouped, "photos": photos}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_calibration_is_saved_with_its_rates(setup):
    cfg = load_config(setup["closed"])
    doc = read_json(layout.work_dir(cfg) / files.CALIBRATION)
    cal = Calibration.from_dict(doc)
    r = cal.rates
    # 12 training photos, closed folds: each fold's 6 validation photos are known queries; the
    # grouped folds' 6 + 6 validation photos are new ones (their individuals never trained).
    assert (r.known, r.new) == (12, 12)
    assert r.known_named_right + r.known_named_wrong + r.known_called_new == pytest.approx(1)
    assert r.new_called_new + r.new_named == pytest.approx(1)
    assert r.known_called_new <= cal.target_value  # the target, max_false_new = 0.05
    assert cal.decision.method == "logistic" and min(cal.decision.coef) >= 0
    assert cal.unmeasured == ()
    text = (layout.work_dir(cfg) / files.CALIBRATION_MD).read_text()
    assert "a new individual is given a known name" in text
    gallery = read_gallery(layout.work_dir(cfg) / files.GALLERY)
    assert len(gallery) == 12 and gallery.folds == ("0", "1")
    assert all(t[:2] == b"\xff\xd8" for t in gallery.thumbs)  # a JPEG thumbnail each


def test_without_grouped_folds_the_new_individual_rates_are_unmeasured(setup, tmp_path, capsys):
    source = layout.model_dir(load_config(setup["closed"]))
    args = [*setup["closed"], f"output_dir={tmp_path}", f"models={source}", "models_verify=false"]
    run_main(calibrate.main, args)
    cal = Calibration.from_dict(read_json(layout.work_dir(load_config(args)) / files.CALIBRATION))
    assert cal.rates.new_named is None and cal.rates.precision is None
    assert cal.decision.method == "top_similarity"
    assert any("new individual is given a known name" in u for u in cal.unmeasured)
    assert "unmeasured" in capsys.readouterr().out


def test_grouped_experiment_alone_cannot_calibrate(setup, capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(calibrate.main, setup["grouped"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "identify.closed_exp" in err and err.count("\n") == 1


def test_command_and_api_agree_and_bad_photos_are_skipped(setup, tmp_path, capsys):
    out = tmp_path / "out"
    records = command.main([str(setup["photos"]), *setup["closed"], f"identify.out={out}"])
    said = capsys.readouterr().out
    assert "skipped" in said and "broken.jpg" in said
    rows = _read_csv(out / files.RESULTS_CSV)
    assert [Path(r["photo"]).name for r in rows] == sorted(
        p.name for p in setup["photos"].iterdir())
    broken = next(r for r in rows if r["photo"].endswith("broken.jpg"))
    assert broken["verdict"] == "error" and "broken.jpg" in broken["error"]
    good = [r for r in rows if r["verdict"] != "error"]
    assert len(good) == 4 and all(r["verdict"] in ("known", "new") for r in good)
    for r in good:
        probs = [float(r[f"probability_{k}"]) for k in range(1, 5)]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) + float(r["new_probability"]) == pytest.approx(1, abs=1e-5)
    # The same photos through the Python API: the same answers.
    identifier = Identifier.load(config="configs/demo.yaml", **_keys(setup["closed"]))
    api = identifier.identify([setup["photos"]], progress=False)
    assert [(str(a.photo), a.verdict, a.identity) for a in api] == \
        [(str(b.photo), b.verdict, b.identity) for b in records]
    page = (out / files.RESULTS_HTML).read_text()
    assert page.count('class="card"') == 5 and "data:image/jpeg;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_a_training_photo_finds_itself(setup, tmp_path):
    """The plumbing from gallery rows to individuals: a photo identical to a gallery photo is
    at cosine 1 from it, so its individual comes first with similarity 1."""
    identifier = Identifier.load(config="configs/demo.yaml", **_keys(setup["closed"]))
    train = sorted((setup["data"] / "train").rglob("*.png"))
    records = identifier.identify(train, progress=False)
    for path, record in zip(train, records, strict=True):
        i = int(path.stem.split("_")[1])
        assert record.candidates[0].identity == IDS[i % len(IDS)]
        assert record.candidates[0].similarity == pytest.approx(1, abs=1e-5)
        assert record.candidates[0].gallery_photo == path.name


def test_known_score_is_the_calibrated_function_of_the_similarities(setup):
    """An independent computation from the saved gallery and calibration."""
    identifier = Identifier.load(config="configs/demo.yaml", **_keys(setup["closed"]))
    photos = sorted(p for p in setup["photos"].iterdir() if p.suffix == ".png")
    per_fold, refused = identifier.embed(photos)
    assert not refused
    gallery = identifier.gallery
    classes, codes = identity_codes(gallery.labels)
    cal = identifier.calibration
    z = np.zeros(len(photos))
    for emb, embedded in zip(per_fold, gallery.embeddings, strict=True):  # each fold model
        scores = identity_scores(emb @ embedded.T, codes, len(classes))
        z += decision_features(scores) @ np.array(cal.decision.coef) + cal.decision.intercept
    z /= len(per_fold)
    records = identifier.identify(photos, progress=False)
    assert [r.known_score for r in records] == pytest.approx(z.tolist())
    assert [r.verdict for r in records] == ["known" if v >= cal.threshold else "new" for v in z]


def test_outputs_are_written_together_or_not_at_all(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [str(setup["photos"]), *setup["closed"], f"identify.out={out}"]
    command.main(args)
    before = snapshot(out)

    def failing(*_a, **_k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(command, "write_csv", failing)
    with pytest.raises(SystemExit):
        run_main(command.main, args)
    assert snapshot(out) == before  # the earlier CSV and page, untouched, nothing beside them


def test_export_carries_the_calibration_read_only(setup, tmp_path):
    cfg = load_config(setup["closed"])
    exported = tmp_path / "export"
    export.main([*setup["closed"], f"out={exported}"])
    folder = exported / CLOSED
    assert all((folder / name).is_file() for name in files.EXPERIMENT_FILES)
    set_writable(folder, False)
    try:
        before = snapshot(folder)
        elsewhere = Identifier.load(folder, output_dir=str(tmp_path / "work"), device="cpu")
        here = Identifier.load(config="configs/demo.yaml", **_keys(setup["closed"]))
        photos = [setup["photos"]]
        a = [(r.verdict, r.identity, r.known_score) for r in elsewhere.identify(photos, False)]
        b = [(r.verdict, r.identity, r.known_score) for r in here.identify(photos, False)]
        assert a == b
        assert snapshot(folder) == before
    finally:
        set_writable(folder, True)
    assert cfg.exp == CLOSED


def test_half_export_is_signed_for_its_own_weights(setup, tmp_path):
    exported = tmp_path / "export"
    export.main([*setup["closed"], f"out={exported}", "export.half=true"])
    identifier = Identifier.load(exported / CLOSED, output_dir=str(tmp_path / "work"))
    records = identifier.identify([setup["photos"]], progress=False)
    assert sum(r.verdict != "error" for r in records) == 4


def test_added_gallery_and_keypoint_matches(setup, tmp_path):
    """identify.gallery adds an individual without retraining; identify.local draws the
    matched keypoints of the photo and that individual's photo."""
    coat = spots(7)
    added = tmp_path / "added" / "Newcomer"
    added.mkdir(parents=True)
    coat_png(added / "coat.png", coat)
    query = coat_png(tmp_path / "query.png", warp(coat))
    out = tmp_path / "out"
    records = command.main([str(query), *setup["closed"], f"identify.gallery={added.parent}",
                            "identify.local=true", "identify.top_k=10", f"identify.out={out}"])
    (record,) = records
    newcomer = next(c for c in record.candidates if c.identity == "Newcomer")
    assert newcomer.inliers is not None and newcomer.inliers >= 8
    assert all(c.inliers is not None for c in record.candidates)  # training photos found too
    rows = _read_csv(out / files.RESULTS_CSV)
    assert "inliers_1" in rows[0]
    assert (out / files.RESULTS_HTML).read_text().count('<img src="data:image/jpeg') >= 2


def test_stale_gallery_and_missing_calibration_are_one_line(setup, tmp_path, capsys):
    copy = tmp_path / "copy"
    source = layout.model_dir(load_config(setup["closed"]))
    shutil.copytree(source, copy)
    # Fold 1 retrained since the calibration: other weights of the same model.
    weights = copy / "fold1" / layout.MODEL_WEIGHTS
    state = load_file(weights)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    with pytest.raises(GalleryError, match="not the weights"):
        Identifier.load(copy, models_verify=False, output_dir=str(tmp_path / "work"))
    (copy / files.CALIBRATION).unlink()
    with pytest.raises(SystemExit):
        run_main(command.main, [str(setup["photos"]), f"models={copy}", "models_verify=false",
                                f"output_dir={tmp_path / 'work'}"])
    err = capsys.readouterr().err
    assert "calibrate it first" in err and err.count("\n") == 1
    with pytest.raises(IdentifyError):
        Identifier.load(copy, models_verify=False, output_dir=str(tmp_path / "work"))


def test_a_missing_photo_path_is_one_line(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(command.main, [str(tmp_path / "nowhere.jpg"), *setup["closed"]])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere.jpg: no such file or folder" in err and err.count("\n") == 1


def _keys(args: list[str]) -> dict[str, str]:
    """Command-line arguments as Identifier.load keywords (dotted names)."""
    return dict(a.split("=", 1) for a in args if not a.startswith("config="))


def _calibrated_copy(setup, tmp_path, *extra: str) -> tuple[list[str], Path]:
    """A copy of both experiments, the closed one calibrated again; (args, its folder)."""
    shutil.copytree(load_config(setup["closed"]).output_dir, tmp_path / "work")
    args = [*setup["closed"], f"output_dir={tmp_path / 'work'}",
            f"identify.grouped_exp={GROUPED}", f"identify.out={tmp_path / 'out'}", *extra]
    run_main(calibrate.main, args)
    return args, layout.work_dir(load_config(args))


def test_a_calibration_and_a_gallery_of_two_runs_are_refused(setup, tmp_path):
    """A calibrate killed between its renames (or a file copied over) leaves a pair from two
    runs; identify and export refuse it instead of applying one run's numbers to the other's
    embeddings."""
    args, work = _calibrated_copy(setup, tmp_path)
    cal = read_json(work / files.CALIBRATION)
    assert len(cal["run_id"]) == 16 and read_gallery(work / files.GALLERY).run_id == cal["run_id"]
    (work / files.CALIBRATION).write_text(
        (work / files.CALIBRATION).read_text().replace(cal["run_id"], "0" * 16))
    with pytest.raises(IdentifyError, match="two different calibrate runs"):
        Identifier.load(**_keys(args), config="configs/demo.yaml")
    with pytest.raises(SystemExit) as stop:
        run_main(export.main, [*args, f"out={tmp_path / 'export'}"])
    assert stop.value.code == 2 and not (tmp_path / "export" / CLOSED).exists()


def test_keys_fixed_at_calibration_apply_with_a_note(setup, tmp_path, capsys):
    """new_share and the retrieval embedding are the calibration's, whatever today's keys say;
    setting one to another value is noted."""
    args, _ = _calibrated_copy(setup, tmp_path, "identify.new_share=0.2",
                               "submit.retrieval=neck")
    photos = sorted((setup["data"] / "train").rglob("*.png"))[:3]
    capsys.readouterr()
    calibrated = Identifier.load(**_keys(args), config="configs/demo.yaml")
    assert capsys.readouterr().out == ""
    assert calibrated.cfg.identify.new_share == 0.2
    assert calibrated.cfg.submit.retrieval == "neck"
    for record in calibrated.identify(photos, progress=False):
        assert record.candidates[0].similarity == pytest.approx(1, abs=1e-5)  # finds itself
    today = Identifier.load(**(_keys(args) | {"identify.new_share": 0.9,
                                              "submit.retrieval": "backbone"}),
                            config="configs/demo.yaml")
    said = capsys.readouterr().out
    assert "identify.new_share=0.9 is fixed at calibration" in said
    assert "submit.retrieval=backbone is fixed at calibration" in said
    a = [(r.identity, r.new_probability) for r in calibrated.identify(photos, progress=False)]
    b = [(r.identity, r.new_probability) for r in today.identify(photos, progress=False)]
    assert a == b


def test_an_export_identifies_with_its_own_calibration(setup, tmp_path, capsys):
    """The export's saved config names the training machine's output_dir; a calibration
    made there after the export must not be read in place of the export's."""
    args, work = _calibrated_copy(setup, tmp_path)
    exported = tmp_path / "export"
    export.main([*args, f"out={exported}"])
    run_main(calibrate.main, [*args, "identify.target=min_precision",
                              "identify.min_precision=0.1"])  # the training folder, again
    assert read_json(work / files.CALIBRATION)["target"] == "min_precision"
    shipped = Identifier.load(exported / CLOSED, device="cpu",
                              output_dir=str(tmp_path / "elsewhere"))
    assert shipped.calibration.target == "max_false_new"
    here = Path.cwd()
    os.chdir(tmp_path)  # no output_dir given: today's default, never the training machine's
    try:
        default = Identifier.load(exported / CLOSED, device="cpu")
    finally:
        os.chdir(here)
    assert default.calibration.target == "max_false_new"
    assert default.cfg.exp == CLOSED  # the experiment the export holds, not the default name
    assert default.calibration.run_id == read_json(exported / CLOSED / files.CALIBRATION)[
        "run_id"]
    # A calibration made on this machine (./output/<exp>/) is read first, as every later
    # step's files are, and says so.
    here_too = tmp_path / "output" / CLOSED
    here_too.mkdir(parents=True)
    for name in files.EXPERIMENT_FILES:
        shutil.copy(work / name, here_too / name)
    capsys.readouterr()
    os.chdir(tmp_path)
    try:
        local = Identifier.load(exported / CLOSED, exp=CLOSED, device="cpu")
    finally:
        os.chdir(here)
    assert local.calibration.target == "min_precision"
    assert "not the one that came with the models" in capsys.readouterr().out


def test_a_pair_read_while_a_calibration_is_committed_is_read_again(setup, monkeypatch):
    """A reader between a calibrate's two renames sees two runs' files; under the commit's
    lock it reads them again, after the renames."""
    from jaguar_reid.identify import identifier as module

    real = module._read_pair
    reads: list = []

    def mid_commit(cfg, path):
        calibration, gallery = real(cfg, path)
        reads.append(path)
        if len(reads) == 1:  # the gallery of a run whose calibration is not in place yet
            from dataclasses import replace
            gallery = replace(gallery, run_id="f" * 16)
        return calibration, gallery
    monkeypatch.setattr(module, "_read_pair", mid_commit)
    identifier = Identifier.load(config="configs/demo.yaml", **_keys(setup["closed"]))
    assert len(reads) == 2 and identifier.gallery.run_id == identifier.calibration.run_id


def test_broken_weights_stop_the_calibration_in_one_line(setup, tmp_path, capsys):
    copy = tmp_path / "nan"
    shutil.copytree(layout.model_dir(load_config(setup["closed"])), copy)
    weights = copy / "fold0" / layout.MODEL_WEIGHTS
    state = load_file(weights)
    save_file({k: v * float("nan") if v.is_floating_point() else v
               for k, v in state.items()}, weights)
    with pytest.raises(SystemExit) as stop:
        run_main(calibrate.main, [*setup["closed"], f"models={copy}", "models_verify=false",
                                  f"output_dir={tmp_path / 'work'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "NaN or inf" in err and "fold 0" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "work" / CLOSED / files.CALIBRATION).exists()


def test_a_file_name_that_is_not_utf8_and_a_large_top_k(setup, tmp_path):
    photos = tmp_path / "latin"
    photos.mkdir()
    shutil.copy(setup["photos"] / "known_0.png", photos / "plain.png")
    odd = os.fsdecode(b"lat\xe9.png")  # a Latin-1 name, as old cameras write them
    shutil.copy(setup["photos"] / "known_0.png", photos / odd)
    out = tmp_path / "out"
    command.main([str(photos), *setup["closed"], f"identify.out={out}", "identify.top_k=1000"])
    with open(out / files.RESULTS_CSV, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(r["photo"]).name for r in rows) == ["lat\\udce9.png", "plain.png"]
    assert rows[0]["verdict"] != "error" and rows[1]["verdict"] != "error"
    assert f"identity_{len(IDS)}" in rows[0] and f"identity_{len(IDS) + 1}" not in rows[0]
