"""Bad inputs, one at a time, and what each gets: an error naming the file, row or key (and,
through a command-line entry point, one `error: ...` line and exit status 2), or a documented
fallback that is reported. docs/bad_inputs.md is the table of these tests.

Every test builds its own tiny dataset (a dozen 24 x 16 RGBA images): nothing is trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jaguar_reid import layout, submission
from jaguar_reid import train as train_cli
from jaguar_reid.config import ConfigError, load_config, parse_fold_spec
from jaguar_reid.data import audit as datacheck_cli
from jaguar_reid.data import image_cache as cache_cli
from jaguar_reid.data import splits as folds_cli
from jaguar_reid.data.csv_tables import (
    DataError,
    read_sample_submission,
    read_test_csv,
    read_train_csv,
    resolve_image_paths,
)
from jaguar_reid.data.images import image_loader, load_image, read_rgba
from jaguar_reid.data.splits import assign_closed_folds, assign_grouped_folds
from jaguar_reid.io_utils import run_main
from jaguar_reid.retrieval import embedding as retrieval_embed
from jaguar_reid.retrieval.embedding import ensemble_embeddings
from jaguar_reid.retrieval.metrics import (
    identity_balanced_map,
    pair_roc_auc,
    per_identity_ap,
    per_query_ap,
)
from jaguar_reid.retrieval.oof import score_experiment
from tests.helpers import (
    SAMPLE_HEADER,
    TEST_HEADER,
    TRAIN_HEADER,
    base_args,
    bomb_png,
    fake_experiment,
    make_data,
    tiny_png,
)

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def data(tmp_path) -> Path:
    return make_data(tmp_path / "data")


def cli_error(main, argv: list[str], capsys) -> str:
    """Run an entry point the way its script does; it must end with exit status 2 and one
    `error: ...` line (no traceback). Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- CSV files

TRAIN_CASES = {
    "renamed-column": ("filename,label\na.png,x\n", "missing column.*ground_truth.*found "
                       "filename, label"),
    "column-twice": ("filename,ground_truth,filename\na.png,x,b.png\n",
                     "filename appear more than once in the header"),
    "extra-field": (TRAIN_HEADER + "a.png,x\nb.png,y,z\n", "Expected 2 fields in line 3, saw 3"),
    # pandas alone would read the first field of every row as an index and shift the rest.
    "extra-field-every-row": (TRAIN_HEADER + "a.png,x,1\nb.png,y,2\n",
                              "line 2: 3 fields, but the header has 2"),
    "missing-field": (TRAIN_HEADER + "a.png,x\nb.png\n",
                      "row 3: empty value in column 'ground_truth'"),
    "empty-label": (TRAIN_HEADER + "a.png,x\nb.png,  \n",
                    "row 3: empty value in column 'ground_truth'"),
    "nan-label": (TRAIN_HEADER + "a.png,x\nb.png,NaN\n", "row 3: ground_truth 'NaN' marks a "
                  "missing label"),
    "none-label": (TRAIN_HEADER + "a.png,x\nb.png,None\n", "row 3: ground_truth 'None'"),
    "na-label": (TRAIN_HEADER + "a.png,x\nb.png,#N/A\n", "row 3: ground_truth '#N/A'"),
    "duplicate-filename": (TRAIN_HEADER + "a.png,x\na.png,y\n",
                           "row 3: filename 'a.png' appears more than once"),
    "same-file-spelt-twice": (TRAIN_HEADER + "a.png,x\n./a.png,x\n",
                              r"row 3: filename '\./a\.png' appears more than once"),
    "parent-path": (TRAIN_HEADER + "a.png,x\n../../etc/passwd,x\n",
                    "row 3: filename '../../etc/passwd' must be a file name inside the data "
                    "folder"),
    "absolute-path": (TRAIN_HEADER + "a.png,x\n/etc/passwd,x\n", "row 3: filename '/etc/passwd'"),
    "backslash-path": (TRAIN_HEADER + "a.png,x\n..\\..\\x.png,x\n", r"row 3: filename '\.\."),
    "header-only": (TRAIN_HEADER, "no rows"),
    "empty-file": ("", "empty file, expected columns filename, ground_truth"),
    "unclosed-quote": (TRAIN_HEADER + 'a.png,x\n"b.png,y\n', "not a readable CSV"),
}


@pytest.mark.parametrize("text, fragment", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_train_csv_bad(tmp_path, text, fragment):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=fragment) as info:
        read_train_csv(path)
    assert str(path) in str(info.value)


def test_train_csv_not_text(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xff\xfe\x00\x81\x00binary")
    with pytest.raises(DataError, match="not UTF-8 text \\(byte 0xff on line 1\\)") as info:
        read_train_csv(path)
    assert str(path) in str(info.value)
    # A spreadsheet's Latin-1 export: the byte and its line named, and what to do.
    path.write_bytes(b"filename,ground_truth\na.png,Marcela\nb.png,Jos\xe9\n")
    with pytest.raises(DataError, match="byte 0xe9 on line 3\\); save it as UTF-8"):
        read_train_csv(path)


TEST_CASES = {
    "missing-column": ("row_id,query_image\n0,a.png\n", "missing column.*gallery_image"),
    "renamed-row-id": ("id,query_image,gallery_image\n0,a.png,b.png\n", "missing column.*row_id"),
    "duplicate-row-id": (TEST_HEADER + "0,a.png,b.png\n0,b.png,a.png\n",
                         "row 3: row_id 0 appears more than once"),
    "missing-row-id": (TEST_HEADER + "0,a.png,b.png\n,b.png,a.png\n",
                       "row 3: empty value in column 'row_id'"),
    "text-row-id": (TEST_HEADER + "0,a.png,b.png\nx,b.png,a.png\n",
                    "row 3: row_id must be an integer, got 'x'"),
    "fraction-row-id": (TEST_HEADER + "0,a.png,b.png\n1.5,b.png,a.png\n",
                        "row 3: row_id must be an integer, got '1.5'"),
    "infinite-row-id": (TEST_HEADER + "0,a.png,b.png\ninf,b.png,a.png\n",
                        "row 3: row_id must be an integer, got 'inf'"),
    "overflowing-row-id": (TEST_HEADER + "0,a.png,b.png\n99999999999999999999,b.png,a.png\n",
                           "row 3: row_id must be an integer"),
    "parent-path-query": (TEST_HEADER + "0,a.png,b.png\n1,../b.png,a.png\n",
                          "row 3: query_image '../b.png' must be a file name inside"),
    "absolute-path-gallery": (TEST_HEADER + "0,a.png,b.png\n1,b.png,/etc/passwd\n",
                              "row 3: gallery_image '/etc/passwd' must be a file name inside"),
    "header-only": (TEST_HEADER, "no rows"),
}


@pytest.mark.parametrize("text, fragment", TEST_CASES.values(), ids=TEST_CASES.keys())
def test_test_csv_bad(tmp_path, text, fragment):
    path = tmp_path / "test.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=fragment) as info:
        read_test_csv(path)
    assert str(path) in str(info.value)


SAMPLE_CASES = {
    "renamed-column": ("row_id,score\n0,0.5\n", "missing column.*similarity"),
    "duplicate-row-id": (SAMPLE_HEADER + "0,0.5\n0,0.5\n", "row 3: row_id 0 appears more"),
    "text-row-id": (SAMPLE_HEADER + "0,0.5\nx,0.5\n", "row 3: row_id must be an integer"),
    "header-only": (SAMPLE_HEADER, "no rows"),
}


@pytest.mark.parametrize("text, fragment", SAMPLE_CASES.values(), ids=SAMPLE_CASES.keys())
def test_sample_submission_bad(tmp_path, text, fragment):
    path = tmp_path / "sample_submission.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=fragment) as info:
        read_sample_submission(path)
    assert str(path) in str(info.value)


def test_renamed_train_column_at_the_command_line(data, tmp_path, capsys):
    (data / "train.csv").write_text("file,ground_truth\ntrain_0000.png,Marcela\n")
    err = cli_error(folds_cli.main, base_args(data, tmp_path), capsys)
    assert f"{data / 'train.csv'}: missing column(s) filename" in err


def test_missing_test_column_at_the_command_line(data, tmp_path, capsys):
    (data / "test.csv").write_text("row_id,query_image\n0,test_0001.png\n")
    err = cli_error(cache_cli.main, base_args(data, tmp_path), capsys)
    assert f"{data / 'test.csv'}: missing column(s) gallery_image" in err


def test_renamed_sample_column_at_submit(data, tmp_path, capsys):
    args = base_args(data, tmp_path, "exp=e", "submit.folds=0")
    fake_experiment(args, weights="garbage")  # the CSVs are read before any model
    (data / "sample_submission.csv").write_text("row_id,score\n0,0.5\n")
    err = cli_error(submission.main, args, capsys)
    assert f"{data / 'sample_submission.csv'}: missing column(s) similarity" in err


def test_duplicate_row_id_at_submit(data, tmp_path, capsys):
    args = base_args(data, tmp_path, "exp=e", "submit.folds=0")
    fake_experiment(args, weights="garbage")
    lines = (data / "test.csv").read_text().splitlines()
    lines[3] = "0," + lines[3].split(",", 1)[1]
    (data / "test.csv").write_text("\n".join(lines) + "\n")
    err = cli_error(submission.main, args, capsys)
    assert f"{data / 'test.csv'}: row 4: row_id 0 appears more than once" in err


# --------------------------------------------------------------------------- sample vs test.csv


@pytest.mark.parametrize("sample_ids, fragment", [
    ([0, 2, 1], "row 1: row_id 1 but sample_submission.csv has 2"),
    ([0, 1], "3 rows but sample_submission.csv has 2"),
    ([0, 1, 2, 3], "3 rows but sample_submission.csv has 4"),
    ([0, 1, 7], "row 2: row_id 2 but sample_submission.csv has 7"),
], ids=["other-order", "row-missing", "row-extra", "other-id"])
def test_sample_disagreeing_with_test_csv(sample_ids, fragment):
    test_df = pd.DataFrame({"row_id": [0, 1, 2], "query_image": ["a", "b", "c"],
                            "gallery_image": ["b", "c", "a"]})
    sub = submission.build_submission(test_df, np.array([0.1, 0.5, 0.9]))
    sample = pd.DataFrame({"row_id": sample_ids, "similarity": ["0.5"] * len(sample_ids)})
    with pytest.raises(DataError, match=fragment):
        submission.validate_submission(sub, sample, "sample_submission.csv")


def drop_last_sample_row(data: Path) -> None:
    lines = (data / "sample_submission.csv").read_text().splitlines()
    (data / "sample_submission.csv").write_text("\n".join(lines[:-1]) + "\n")


def test_sample_disagreeing_with_test_csv_at_submit(data, tmp_path, capsys, tiny_cfg_args):
    args = [*tiny_cfg_args, *base_args(data, tmp_path, "exp=e", "submit.folds=0")]
    exp = fake_experiment(args)
    drop_last_sample_row(data)
    err = cli_error(submission.main, args, capsys)
    assert f"submission has 6 rows but {data / 'sample_submission.csv'} has 5" in err
    assert not (exp / layout.SUBMISSION).exists()


def test_sample_disagreeing_with_test_csv_is_found_before_any_model_runs(
        data, tmp_path, capsys, monkeypatch, tiny_cfg_args):
    args = [*tiny_cfg_args, *base_args(data, tmp_path, "exp=e", "submit.folds=0")]
    fake_experiment(args)
    drop_last_sample_row(data)

    def no_model(*args, **kwargs):
        raise AssertionError("a model ran before sample_submission.csv was checked")
    monkeypatch.setattr(retrieval_embed, "load_trained_model", no_model)
    err = cli_error(submission.main, args, capsys)
    assert "sample_submission.csv" in err


# --------------------------------------------------------------------------- images


def test_pair_naming_an_image_not_on_disk(data, tmp_path, capsys):
    with open(data / "test.csv", "a") as handle:
        handle.write("6,test_0001.png,test_9999.png\n")
    err = cli_error(cache_cli.main, base_args(data, tmp_path), capsys)
    assert f"{data / 'test.csv'}: 1 image(s) not found beneath {data}: 'test_9999.png'" in err


def test_image_found_twice_beneath_the_data_folder(data, tmp_path, capsys):
    tiny_png(data / "copy" / "test_0001.png", 100)
    err = cli_error(cache_cli.main, base_args(data, tmp_path), capsys)
    assert f"{data / 'test.csv'}: image 'test_0001.png' is found more than once" in err


@pytest.fixture
def outside(tmp_path) -> Path:
    """An image outside the data folder that a link inside it may point at."""
    return tiny_png(tmp_path / "elsewhere" / "secret.png", 7)


def test_link_to_a_file_outside_the_data_folder(data, tmp_path, outside, capsys):
    link = data / "test" / "test" / "test_0002.png"
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(DataError, match="outside the data folder") as info:
        resolve_image_paths(data, ["test_0001.png", "test_0002.png"], data / "test.csv")
    message = str(info.value)
    assert str(data / "test.csv") in message and "'test_0002.png'" in message
    assert str(outside) in message
    err = cli_error(cache_cli.main, base_args(data, tmp_path), capsys)
    assert "test_0002.png" in err and "outside the data folder" in err


def test_link_to_a_folder_outside_the_data_folder(data, outside):
    (data / "linked").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(DataError, match=r"image 'linked/secret\.png' .*outside the data folder"):
        resolve_image_paths(data, ["linked/secret.png"], data / "train.csv")


def test_links_that_stay_inside_the_data_folder_are_followed(data, tmp_path):
    (data / "test" / "alias.png").symlink_to(data / "test" / "test" / "test_0001.png")
    assert resolve_image_paths(data, ["alias.png"], "test.csv") == [data / "test" / "alias.png"]
    # The data folder itself may be a link (Kaggle mounts, a big disk).
    (tmp_path / "via_link").symlink_to(data, target_is_directory=True)
    found = resolve_image_paths(tmp_path / "via_link", ["test_0001.png"], "test.csv")
    assert found == [tmp_path / "via_link" / "test" / "test" / "test_0001.png"]


def corrupt_images(data: Path) -> dict[str, str]:
    """Break four train images, each its own way; returns name -> expected problem kind."""
    folder = data / "train" / "train"
    (folder / "train_0000.png").write_bytes(b"this is not a PNG")
    whole = (folder / "train_0001.png").read_bytes()
    (folder / "train_0001.png").write_bytes(whole[: len(whole) // 2])
    (folder / "train_0002.png").write_bytes(b"")
    bomb_png(folder / "train_0003.png", 20000, 20000)
    return {"train_0000.png": "unreadable", "train_0001.png": "truncated",
            "train_0002.png": "unreadable", "train_0003.png": "absurd dimensions"}


def test_corrupt_truncated_empty_and_bomb_images_at_the_command_line(data, tmp_path, capsys):
    broken = corrupt_images(data)
    err = cli_error(cache_cli.main, base_args(data, tmp_path), capsys)
    assert "4 image(s) cannot be used" in err
    for name, kind in broken.items():
        assert f"{data / 'train' / 'train' / name}: {kind}" in err, err


def test_one_file_name_in_two_folders_keeps_two_cache_files(tmp_path):
    """`train/0001.png` and `test/0001.png` are two images: the cache must not serve one for
    the other (it once named cached files by their stem alone)."""
    from jaguar_reid.data.image_cache import build_cache

    first = tiny_png(tmp_path / "train" / "0001.png", 1)
    second = tiny_png(tmp_path / "test" / "0001.png", 2)
    third = tmp_path / "test" / "0001.jpg"
    Image.new("RGB", (24, 16), (1, 2, 3)).save(third)
    cfg = load_config([f"output_dir={tmp_path / 'out'}", "cache.workers=1"])
    cached, _ = build_cache([first, second, third], cfg)
    assert len(set(cached)) == 3
    for source, copy in zip([first, second, third], cached, strict=True):
        assert np.array_equal(read_rgba(copy), read_rgba(source))


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"x": 1}'],
                         ids=["not-json", "not-text", "a-list", "other-entries"])
def test_damaged_cache_index_is_rebuilt(tmp_path, capsys, damage):
    from jaguar_reid.data.image_cache import build_cache, cache_dir

    source = tiny_png(tmp_path / "a.png", 1)
    cfg = load_config([f"output_dir={tmp_path / 'out'}", "cache.workers=1"])
    build_cache([source], cfg)
    (cache_dir(cfg) / "index.json").write_bytes(damage)
    capsys.readouterr()
    (cached,), (record,) = build_cache([source], cfg)
    assert "rebuilding the cache" in capsys.readouterr().out
    assert np.array_equal(read_rgba(cached), read_rgba(source)) and record["action"] == ""


def test_problem_kind_comes_from_the_image_not_its_path(tmp_path):
    from jaguar_reid.data.image_cache import process_image

    folder = tmp_path / "truncated_copies"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"not an image at all")
    record = process_image(str(folder / "x.png"), str(tmp_path / "out.png"), False, 0.0, 64,
                           10**6)
    assert record["problems"][0].startswith("unreadable:") and record["action"] == "error"
    whole = tiny_png(tmp_path / "ok.png", 0).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    record = process_image(str(tmp_path / "cut.png"), str(tmp_path / "out.png"), False, 0.0, 64,
                           10**6)
    assert record["problems"][0].startswith("truncated:")


@pytest.mark.parametrize("name", ["train_0000.png", "train_0001.png", "train_0002.png",
                                  "train_0003.png"],
                         ids=["corrupt", "truncated", "empty", "bomb"])
def test_bad_image_without_the_cache_names_the_file(data, name):
    corrupt_images(data)
    path = data / "train" / "train" / name
    with pytest.raises(DataError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_image_above_max_pixels(data, tmp_path, capsys):
    big = tiny_png(data / "train" / "train" / "train_0004.png", 4, size=(64, 64))
    cfg = load_config(base_args(data, tmp_path, "data.max_pixels=1000", "cache.enabled=false"))
    with pytest.raises(DataError, match=r"64x64 pixels, more than data\.max_pixels=1000") as info:
        image_loader(cfg)(big)
    assert str(big) in str(info.value)
    assert image_loader(cfg)(data / "train" / "train" / "train_0005.png").size == (24, 16)
    err = cli_error(cache_cli.main, base_args(data, tmp_path, "data.max_pixels=1000"), capsys)
    assert f"{big}: absurd dimensions: 64x64" in err


def test_bad_images_are_listed_by_the_data_check(data, tmp_path, outside):
    """The data check is the one place that goes on past bad images: it lists each with its
    problem and action instead of stopping at the first."""
    broken = corrupt_images(data)
    link = data / "train" / "train" / "train_0004.png"
    link.unlink()
    link.symlink_to(outside)
    with open(data / "test.csv", "a") as handle:
        handle.write("6,test_0001.png,test_9999.png\n")
    args = base_args(data, tmp_path)
    run_main(datacheck_cli.main, args)
    report_dir = layout.datacheck_dir(load_config(args))
    summary = json.loads((report_dir / "summary.json").read_text())
    problems = {p["filename"]: p for p in summary["problems"]}
    for name, kind in broken.items():
        assert problems[name]["problem"].startswith(kind) and problems[name]["action"] == "error"
    assert problems["test_9999.png"]["problem"] == "missing"
    assert problems["train_0004.png"]["problem"] == f"outside data.dir: leads to {outside}"
    report = (report_dir / "report.md").read_text()
    assert "train_0004.png" in report and "test_9999.png" in report


# --------------------------------------------------------------------------- labels


def test_identity_with_one_image_is_kept_and_skipped_as_a_query():
    """Fallback: a lone image has no positive, so its AP is undefined; it is left out of mAP
    (not scored 0) but stays in every other query's gallery and in pair AUC."""
    rng = np.random.default_rng(0)
    labels = np.array(["a", "a", "a", "b", "b", "lone"])
    sim = rng.normal(size=(6, 6))
    ap = per_query_ap(sim, labels)
    assert np.isnan(ap[5]) and not np.isnan(ap[:5]).any()
    assert "lone" not in per_identity_ap(sim, labels)
    assert identity_balanced_map(sim, labels) == pytest.approx(
        (ap[:3].mean() + ap[3:5].mean()) / 2)
    # Raising the lone image in every ranking lowers the others' AP: it is a gallery negative.
    raised = sim.copy()
    raised[:, 5] = 10.0
    assert identity_balanced_map(raised, labels) < identity_balanced_map(sim, labels)
    assert 0 <= pair_roc_auc(sim, labels) <= 1
    # Only lone images: no query has a positive, mAP is NaN (reported, not an error).
    assert np.isnan(identity_balanced_map(sim, np.array(list("abcdef"))))


def test_identity_with_one_image_in_the_folds():
    labels = np.array(["a"] * 5 + ["b"] * 4 + ["lone"])
    for folds in (assign_grouped_folds(labels, 2, seed=0), assign_closed_folds(labels, 2, 0)):
        assert len(folds) == 10 and set(folds.tolist()) == {0, 1}


def test_nan_label_at_the_command_line(data, tmp_path, capsys):
    text = (data / "train.csv").read_text().replace("train_0005.png,Kwang",
                                                    "train_0005.png,nan")
    (data / "train.csv").write_text(text)
    err = cli_error(folds_cli.main, base_args(data, tmp_path), capsys)
    assert f"{data / 'train.csv'}: row 7: ground_truth 'nan' marks a missing label" in err


# --------------------------------------------------------------------------- config


def test_unknown_key_at_the_command_line(data, tmp_path, capsys):
    err = cli_error(train_cli.main, base_args(data, tmp_path, "train.epoch=3"), capsys)
    assert "unknown config key 'train.epoch'; did you mean train.epochs" in err


def test_wrong_type_at_the_command_line(data, tmp_path, capsys):
    err = cli_error(train_cli.main, base_args(data, tmp_path, "train.batch_size=big"), capsys)
    assert "key 'train.batch_size' expects int" in err and "'big'" in err


def test_unknown_key_and_wrong_type_in_a_yaml_file(tmp_path, capsys):
    bad = tmp_path / "exp.yaml"
    bad.write_text("base: default.yaml\ntrain:\n  epochz: 3\n")
    err = cli_error(train_cli.main, [f"config={bad}"], capsys)
    assert f"{bad}: unknown config key 'train.epochz'" in err
    bad.write_text("base: default.yaml\ndata:\n  fill: grey\n")
    err = cli_error(train_cli.main, [f"config={bad}"], capsys)
    assert f"{bad}: key 'data.fill' expects list" in err


@pytest.mark.parametrize("arg", ["train=3", "train.epochs", "=3"],
                         ids=["section-as-key", "no-value", "no-key"])
def test_malformed_override(arg):
    with pytest.raises(ConfigError, match="unknown config key 'train'|key=value"):
        load_config([arg])


@pytest.mark.parametrize("arg", ["train.lr=nan", "model.arcface_m=inf"])
def test_non_finite_float_override_names_the_key(arg):
    with pytest.raises(ConfigError, match=arg.split("=")[0].replace(".", r"\.")):
        load_config([arg])


# --------------------------------------------------------------------------- folds


def test_fold_out_of_range_at_the_command_line(data, tmp_path, capsys):
    err = cli_error(train_cli.main,
                    base_args(data, tmp_path, "folds.n_folds=5", "fold=7"), capsys)
    assert "key 'fold': fold 7 is out of range for folds.n_folds=5 (valid: 0..4 or full)" in err


def test_submit_fold_out_of_range_names_submit_folds(data, tmp_path, capsys):
    args = base_args(data, tmp_path, "exp=e", "folds.n_folds=5", "submit.folds=7")
    err = cli_error(submission.main, args, capsys)
    assert "key 'submit.folds'" in err


def test_saved_folds_of_another_n_folds(data, tmp_path, capsys):
    run_main(folds_cli.main, base_args(data, tmp_path))
    err = cli_error(folds_cli.main, base_args(data, tmp_path, "folds.n_folds=3"), capsys)
    assert f"{tmp_path / 'folds.csv'}: holds folds [0, 1], but folds.n_folds=3" in err


def text_fold(text: str) -> str:
    lines = text.splitlines()
    header, row = lines[0].split(","), lines[1].split(",")
    row[header.index("fold")] = "zero"
    return "\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n"


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t + t.splitlines()[1] + "\n", "row 14: filename 'train_0000.png' appears more"),
    (text_fold, "row 2: column 'fold' must hold integers, got 'zero'"),
    (lambda t: text_fold(t).replace("zero", "inf"), "row 2: column 'fold' must hold integers, "
     "got 'inf'"),
    (lambda t: "", "not a readable folds file"),
    (lambda t: t.replace("train_0003.png", "train_0099.png"), "does not match train.csv"),
], ids=["image-in-two-folds", "text-fold", "infinite-fold", "empty", "other-images"])
def test_hand_edited_folds_file(data, tmp_path, capsys, edit, fragment):
    run_main(folds_cli.main, base_args(data, tmp_path, "folds.dup_threshold=-1"))
    path = tmp_path / "folds.csv"
    path.write_text(edit(path.read_text()))
    err = cli_error(folds_cli.main, base_args(data, tmp_path), capsys)
    assert str(path) in err and re.search(fragment, err), err


def test_parse_fold_spec_refuses_out_of_range():
    with pytest.raises(ConfigError, match="fold 7 is out of range"):
        parse_fold_spec("7", 5)


# --------------------------------------------------------------------------- submit.py


def test_experiment_with_missing_folds_at_submit(data, tmp_path, capsys):
    args = base_args(data, tmp_path, "exp=e", "submit.folds=all")
    exp = fake_experiment(args, folds=(0,), weights="garbage")
    err = cli_error(submission.main, args, capsys)
    assert f"experiment 'e': no trained model in {layout.fold_dir(exp, 1)}" in err
    assert str(layout.fold_dir(exp, 0)) not in err


def test_unreadable_fold_config_at_submit(data, tmp_path, capsys):
    args = base_args(data, tmp_path, "exp=e", "submit.folds=0")
    saved = layout.fold_dir(fake_experiment(args, weights="garbage"), 0) / layout.RUN_CONFIG
    saved.write_text("train:\n  epochz: 1\n")
    err = cli_error(submission.main, args, capsys)
    assert str(saved) in err and "train.epochz" in err


def test_corrupt_fold_weights_at_submit(data, tmp_path, capsys):
    args = base_args(data, tmp_path, "exp=e", "submit.folds=0", "cache.enabled=false")
    exp = fake_experiment(args, weights="garbage")
    err = cli_error(submission.main, args, capsys)
    assert str(layout.fold_dir(exp, 0) / layout.MODEL_WEIGHTS) in err


# --------------------------------------------------------------------------- NaN embeddings


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_ensemble_refuses_nan_embeddings():
    good = np.eye(3, dtype=np.float32)
    bad = good.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        ensemble_embeddings([good, bad])
    with pytest.raises(ValueError, match="NaN or infinite"):
        ensemble_embeddings([good, np.where(good > 0, np.inf, 0)], "concat")


def test_nan_embeddings_at_submit(data, tmp_path, capsys, tiny_cfg_args):
    args = [*tiny_cfg_args, *base_args(data, tmp_path, "exp=e", "submit.folds=0")]
    exp = fake_experiment(args, weights="nan")
    err = cli_error(submission.main, args, capsys)
    weights = layout.fold_dir(exp, 0) / layout.MODEL_WEIGHTS
    assert str(weights) in err and "test_0001.png" in err


def nan_fold(tmp_path: Path) -> Path:
    """A finished fold whose validation embeddings hold a NaN (no weights); returns the
    experiment folder."""
    emb = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]]
    emb[2] = np.nan
    val = {"embeddings": emb, "labels": np.array(list("aabb")),
           "filenames": np.array([f"train_{i}.png" for i in range(4)])}
    return fake_experiment([f"output_dir={tmp_path}", "exp=exp"], weights=None, val=val)


def test_nan_validation_embeddings_are_refused_by_scoring(tmp_path):
    exp = nan_fold(tmp_path)
    with pytest.raises(DataError, match="train_2.png") as info:
        score_experiment(exp, quiet=True)
    assert str(layout.fold_dir(exp, 0) / layout.VAL_EMBEDDINGS) in str(info.value)


def test_nan_scores_rank_last_in_the_metrics():
    """Documented fallback of src/metrics.py: a missing (NaN) score is the lowest score."""
    rng = np.random.default_rng(3)
    labels = np.array(list("aaabbbcc"))
    sim = rng.normal(size=(8, 8))
    sim[0, 1] = sim[4, 2] = sim[6, 7] = np.nan
    lowest = np.where(np.isnan(sim), -np.inf, sim)
    assert identity_balanced_map(sim, labels) == identity_balanced_map(lowest, labels)
    assert pair_roc_auc(sim, labels) == pair_roc_auc(lowest, labels)
    assert np.isfinite(identity_balanced_map(sim, labels))


def test_nan_similarity_is_refused_by_the_submission_check():
    sample = pd.DataFrame({"row_id": [0, 1], "similarity": ["0.5", "0.5"]})
    sub = pd.DataFrame({"row_id": [0, 1], "similarity": [0.5, np.nan]})
    with pytest.raises(DataError, match=r"row 1 \(row_id 1\): similarity nan"):
        submission.validate_submission(sub, sample, "sample_submission.csv")
