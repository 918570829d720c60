"""Submission pieces: similarity per row, the [0, 1] map, validation and the atomic writer."""

import numpy as np
import pandas as pd
import pytest

from jaguar_reid.data.csv_tables import DataError
from jaguar_reid.retrieval.embedding import ensemble_embeddings, l2_normalize
from jaguar_reid.retrieval.metrics import identity_balanced_map, pair_roc_auc
from jaguar_reid.retrieval.postprocess import cosine_to_unit
from jaguar_reid.retrieval.postprocess import pair_cosine as pair_similarity
from jaguar_reid.submission import (
    build_submission,
    pair_indices,
    score_submission,
    validate_submission,
    write_submission,
)


def all_pairs(names):
    rows = [(q, g) for q in names for g in names if q != g]
    return pd.DataFrame({"row_id": np.arange(len(rows)),
                         "query_image": [q for q, _ in rows],
                         "gallery_image": [g for _, g in rows]})


def test_pair_similarity_matches_a_loop():
    rng = np.random.default_rng(0)
    emb = l2_normalize(rng.normal(size=(5, 8)))
    names = [f"test_{i}.png" for i in range(5)]
    test_df = all_pairs(names)
    q, g = pair_indices(test_df, names)
    sim = pair_similarity(emb, q, g)
    expected = [float(np.dot(emb[a], emb[b])) for a, b in zip(q, g, strict=True)]
    assert np.allclose(sim, expected, atol=1e-6)
    assert test_df.iloc[0][["query_image", "gallery_image"]].tolist() == names[:2]


def test_unknown_image_in_pairs_names_the_row():
    test_df = all_pairs(["a", "b"])
    with pytest.raises(DataError, match="row 2: query_image 'a'"):
        pair_indices(test_df, ["b"])


def test_cosine_to_unit_is_monotone_and_bounded():
    cos = np.array([-1.0, -0.5, 0.0, 0.25, 1.0, 1.0000001])
    unit = cosine_to_unit(cos)
    assert unit.min() >= 0 and unit.max() <= 1
    assert np.all(np.diff(unit[:5]) > 0)


def test_ensemble_of_normalised_embeddings():
    a = np.array([[3.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 2.0], [0.0, 5.0]])
    out = ensemble_embeddings([a, b])
    assert np.allclose(out[0], [1 / np.sqrt(2), 1 / np.sqrt(2)])  # norms do not weigh
    assert np.allclose(out[1], [0.0, 1.0])
    with pytest.raises(ValueError, match="ensemble mode"):
        ensemble_embeddings([a, b], "median")
    with pytest.raises(ValueError, match="differ in shape"):
        ensemble_embeddings([a, b[:1]])
    with pytest.raises(ValueError, match="NaN"):
        ensemble_embeddings([a, np.full((2, 2), np.nan)])


def test_concat_ensemble_similarity_is_the_mean_of_model_similarities():
    rng = np.random.default_rng(4)
    models = [l2_normalize(rng.normal(size=(6, 5))) for _ in range(3)]
    joint = ensemble_embeddings(models, "concat")
    assert joint.shape == (6, 15)
    expected = np.mean([m @ m.T for m in models], axis=0)
    assert np.allclose(joint @ joint.T, expected, atol=1e-6)


def test_validation_catches_each_defect():
    sample = pd.DataFrame({"row_id": [0, 1, 2], "similarity": [0.5] * 3})
    good = pd.DataFrame({"row_id": [0, 1, 2], "similarity": [0.0, 0.5, 1.0]})
    validate_submission(good, sample, "sample_submission.csv")
    cases = [
        (good.iloc[:2], "2 rows but sample_submission.csv has 3"),
        (good.assign(row_id=[0, 2, 1]), "row 1: row_id 2 but"),
        (good.assign(similarity=[0.1, np.nan, 0.2]), r"row 1 \(row_id 1\).*nan"),
        (good.assign(similarity=[0.1, 1.5, 0.2]), "1.5 is not a finite number in"),
        (good.assign(similarity=[-0.1, 0.5, 0.2]), "-0.1"),
    ]
    for bad, fragment in cases:
        with pytest.raises(DataError, match=fragment):
            validate_submission(bad, sample, "sample_submission.csv")


def test_writer_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "submission.csv"
    first = build_submission(all_pairs(["a", "b"]), np.array([0.25, 0.75]))
    write_submission(first, path)
    before = path.read_bytes()

    def die(self, target, **kwargs):
        with open(target, "w") as handle:
            handle.write("row_id,similarity\n0,0.1")  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", die)
    with pytest.raises(KeyboardInterrupt):
        write_submission(first, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temp file left


def test_local_score_reads_the_rows_as_written():
    rng = np.random.default_rng(1)
    names = [f"t{i}" for i in range(9)]
    labels = np.array(list("aaabbbccc"))
    emb = l2_normalize(rng.normal(size=(9, 3)) + 2 * (labels[:, None] == np.array(list("abc"))))
    test_df = all_pairs(names).sample(frac=1.0, random_state=0)  # any row order
    q, g = pair_indices(test_df, names)
    sim = cosine_to_unit(pair_similarity(emb, q, g))
    got = score_submission(test_df, sim, pd.DataFrame({"filename": names,
                                                       "ground_truth": labels}))
    full = emb @ emb.T
    assert got["map"] == pytest.approx(identity_balanced_map(full, labels))
    assert got["pair_auc"] == pytest.approx(pair_roc_auc(full, labels))
    with pytest.raises(DataError, match="no label for 1 test image"):
        score_submission(test_df, sim, pd.DataFrame({"filename": names[:-1],
                                                     "ground_truth": labels[:-1]}))

