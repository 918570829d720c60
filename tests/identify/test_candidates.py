"""Similarities of photos to individuals, the decision features, the photo collection and the
command line's split, each against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax as scipy_softmax

from jaguar_reid.identify.candidates import (
    best_photo,
    decision_features,
    identity_codes,
    identity_scores,
    prototype_scores,
    softmax,
    top_k,
)
from jaguar_reid.identify.command import split_args
from jaguar_reid.identify.csv_output import header, row
from jaguar_reid.identify.identifier import Candidate, Identification, override_args
from jaguar_reid.identify.photos import PhotoInputError, Refused, collect_photos, read_photos


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_nearest_prototype_and_best_photo_against_loops():
    rng = np.random.default_rng(0)
    photos, gallery = _unit(rng, 5), _unit(rng, 11)
    labels = np.array(list("bacabcbbaca"))
    classes, codes = identity_codes(labels)
    assert classes.tolist() == ["a", "b", "c"]
    cos = photos @ gallery.T
    nearest = identity_scores(cos, codes, 3)
    protos = prototype_scores(photos, gallery, codes, 3)
    best = best_photo(cos, codes, 3)
    for q in range(5):
        for c, name in enumerate(classes):
            members = np.flatnonzero(labels == name)
            assert nearest[q, c] == pytest.approx(cos[q, members].max())
            assert best[q, c] == members[np.argmax(cos[q, members])]
            mean = gallery[members].mean(axis=0)
            assert protos[q, c] == pytest.approx(photos[q] @ mean / np.linalg.norm(mean))


def test_decision_features_softmax_and_top_k():
    scores = np.array([[0.2, 0.9, 0.5], [0.4, 0.4, 0.1]])
    assert decision_features(scores) == pytest.approx(np.array([[0.9, 0.4], [0.4, 0.0]]))
    assert decision_features(scores[:, :1]) == pytest.approx(np.array([[0.2, 1.2], [0.4, 1.4]]))
    assert softmax(scores, 7.0) == pytest.approx(scipy_softmax(7.0 * scores, axis=1))
    assert top_k(scores, 2).tolist() == [[1, 2], [0, 1]]  # a tie: the lower index first


def test_collect_photos_walks_folders_and_refuses_a_missing_path(tmp_path):
    for name in ("b/2.JPG", "a/1.png", ".hidden/3.png", "a/notes.txt", "c/.4.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    lone = tmp_path / "no_extension"
    lone.write_bytes(b"x")
    got = collect_photos([tmp_path, lone, tmp_path / "a" / "1.png"])
    assert got == [tmp_path / "a" / "1.png", tmp_path / "b" / "2.JPG", lone]
    with pytest.raises(PhotoInputError, match="missing.jpg: no such file or folder"):
        collect_photos([tmp_path / "missing.jpg"])


def test_read_photos_refuses_a_bad_file_alone(tmp_path):
    from jaguar_reid.data.images import read_rgba

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    got = read_photos([good, bad], lambda p: read_rgba(p, max_pixels=10**6))
    assert got[0].shape == (12, 12, 4)
    assert isinstance(got[1], Refused) and got[1].message.startswith(str(bad))


def test_split_args_and_overrides(tmp_path):
    odd = tmp_path / "a=b.jpg"
    odd.write_bytes(b"x")
    photos, keys = split_args([str(odd), "identify.top_k=3", "folder", "exp=x"])
    assert photos == [str(odd), "folder"] and keys == ["identify.top_k=3", "exp=x"]
    assert override_args({"device": "cpu", "identify": {"local": True, "top_k": 2},
                          "embed.tta": ["orig", "flip"]}) == \
        ["device=cpu", "identify.local=true", "identify.top_k=2", 'embed.tta=["orig", "flip"]']


def test_csv_rows_fill_every_column():
    cand = Candidate("Kwang", 0.75, 0.91, "train_0001.png", 0, inliers=12)
    record = Identification(__import__("pathlib").Path("p.jpg"), "known", "Kwang", 0.2, 1.5,
                            (cand,))
    cols = header(2, local=True)
    values = row(record, 2, local=True)
    assert len(values) == len(cols)
    got = dict(zip(cols, values, strict=True))
    assert (got["identity"], got["identity_1"], got["inliers_1"], got["identity_2"]) == \
        ("Kwang", "Kwang", "12", "")
    error = Identification(__import__("pathlib").Path("x.jpg"), "error", error="x.jpg: bad")
    assert dict(zip(cols, row(error, 2, True), strict=True))["error"] == "x.jpg: bad"


def test_what_a_folder_holds_that_is_left_out_is_named(tmp_path, capsys):
    from jaguar_reid.identify.gallery import added_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (4, 4)).save(photos / "a.png")
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert collect_photos([photos]) == [photos / "a.png"]
    assert f"skipped {photos / 'gone.jpg'}: a link to a file that is not there" in \
        capsys.readouterr().out
    gallery = tmp_path / "gallery"
    (gallery / "Kwang").mkdir(parents=True)
    (gallery / "Empty").mkdir()
    Image.new("RGB", (4, 4)).save(gallery / "Kwang" / "k.png")
    Image.new("RGB", (4, 4)).save(gallery / "loose.png")
    assert added_photos(str(gallery)) == [(gallery / "Kwang" / "k.png", "Kwang")]
    said = capsys.readouterr().out
    assert f"left out {gallery / 'loose.png'}: a photo outside an <individual>/ folder" in said
    assert f"left out {gallery / 'Empty'}/: no photo in it" in said
