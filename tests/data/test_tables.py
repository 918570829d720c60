"""Competition file readers: formats, image paths found in nested folders, and errors naming
file and row."""

from pathlib import Path

import pytest
from PIL import Image

from jaguar_reid.data.csv_tables import (
    DataError,
    pair_image_names,
    read_pseudo_csv,
    read_sample_submission,
    read_test_csv,
    read_train_csv,
    resolve_image_paths,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_train_csv_reads_and_strips(tmp_path):
    df = read_train_csv(write(tmp_path / "train.csv",
                              "filename,ground_truth\ntrain_1.png, Marcela\ntrain_2.png,Kwang\n"))
    assert df.to_dict("list") == {"filename": ["train_1.png", "train_2.png"],
                                  "ground_truth": ["Marcela", "Kwang"]}


@pytest.mark.parametrize("text, fragment", [
    ("file,ground_truth\na.png,x\n", "missing column.*filename"),
    ("filename,label\na.png,x\n", "missing column.*ground_truth"),
    ("filename,ground_truth\na.png,x\nb.png,\n", "row 3: empty value in column 'ground_truth'"),
    ("filename,ground_truth\na.png,x\na.png,y\n", "row 3: filename 'a.png' appears more"),
    ("filename,ground_truth\n../../etc/passwd,x\n", "row 2: .*inside the data folder"),
    ("filename,ground_truth\n", "no rows"),
    ("", "empty file"),
])
def test_train_csv_errors_name_file_and_row(tmp_path, text, fragment):
    path = write(tmp_path / "train.csv", text)
    with pytest.raises(DataError, match=fragment) as info:
        read_train_csv(path)
    assert str(path) in str(info.value)


def test_pseudo_csv_reads_confidences(tmp_path):
    df = read_pseudo_csv(write(tmp_path / "pseudo.csv", "filename,identity,confidence\n"
                               "t1.png,Marcela,0.9\nt2.png,Kwang,0.25\n"))
    assert df["filename"].tolist() == ["t1.png", "t2.png"]
    assert df["confidence"].tolist() == [0.9, 0.25]
    empty = read_pseudo_csv(write(tmp_path / "none.csv", "filename,identity,confidence\n"))
    assert empty.empty  # nothing kept is a valid result: nothing joins training


@pytest.mark.parametrize("text, fragment", [
    ("filename,ground_truth\na.png,x\n", "missing column.*identity"),
    ("filename,identity,confidence\na.png,x,0.5\na.png,y,0.4\n", "row 3: filename 'a.png'"),
    ("filename,identity,confidence\na.png,x,high\n", "row 2: confidence .*'high'"),
    ("filename,identity,confidence\na.png,x,1.5\n", "row 2: confidence must be .*\\[0, 1\\]"),
    ("filename,identity,confidence\n/etc/a.png,x,0.5\n", "row 2: .*inside the data folder"),
])
def test_pseudo_csv_errors_name_file_and_row(tmp_path, text, fragment):
    path = write(tmp_path / "pseudo.csv", text)
    with pytest.raises(DataError, match=fragment) as info:
        read_pseudo_csv(path)
    assert str(path) in str(info.value)


def test_test_csv_and_sample(tmp_path):
    test = read_test_csv(write(tmp_path / "test.csv",
                               "row_id,query_image,gallery_image\n0,a.png,b.png\n1,b.png,a.png\n"))
    assert test["row_id"].tolist() == [0, 1]
    assert pair_image_names(test) == ["a.png", "b.png"]
    with pytest.raises(DataError, match="row 3: row_id must be an integer"):
        read_test_csv(write(tmp_path / "t2.csv",
                            "row_id,query_image,gallery_image\n0,a,b\nx,b,a\n"))
    with pytest.raises(DataError, match="row 3: row_id 0 appears more than once"):
        read_test_csv(write(tmp_path / "t3.csv",
                            "row_id,query_image,gallery_image\n0,a,b\n0,b,a\n"))
    with pytest.raises(DataError, match="missing column.*gallery_image"):
        read_test_csv(write(tmp_path / "t4.csv", "row_id,query_image\n0,a\n"))
    sample = read_sample_submission(write(tmp_path / "s.csv", "row_id,similarity\n0,0.5\n1,0.5\n"))
    assert sample["row_id"].tolist() == [0, 1]


def test_images_found_in_nested_folders(tmp_path):
    nested = tmp_path / "train" / "train"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "train_1.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "train_2.jpg")
    paths = resolve_image_paths(tmp_path, ["train_1.png", "train_2.jpg"], "train.csv")
    assert paths == [nested / "train_1.png", tmp_path / "train_2.jpg"]


def test_missing_and_ambiguous_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match=r"train\.csv: 1 image\(s\) not found.*'y.png'"):
        resolve_image_paths(tmp_path, ["x.png", "y.png"], "train.csv")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "x.png")
    with pytest.raises(DataError, match="found more than once"):
        resolve_image_paths(tmp_path, ["x.png"], "train.csv")
    with pytest.raises(DataError, match="is not a folder"):
        resolve_image_paths(tmp_path / "nope", ["x.png"], "train.csv")
