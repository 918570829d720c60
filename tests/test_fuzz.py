"""Property-based tests (hypothesis): untrusted text, config overrides, metrics, submissions.

Each property holds for every input hypothesis draws:
- CSV readers: any text or bytes gives a checked DataFrame or a DataError (never another
  exception); a valid file reads back to what was written.
- Config: any `key=value` gives a Config of the default's types or a ConfigError naming the key.
- Metrics: identity-balanced mAP and pair AUC depend on the ranking alone (invariant to a
  strictly increasing rescaling; mAP per query), reversed scores give 1 - AUC, and both agree
  with scikit-learn.
- Submission: a written file reads back to the same row_ids and similarities within the float
  format's precision; invalid values and row orders are refused, naming the row.
"""

from __future__ import annotations

import csv
import io
import math
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from jaguar_reid.config import AUTO, Config, ConfigError, load_config, to_plain
from jaguar_reid.data.csv_tables import (
    MISSING_MARKERS,
    SUBMISSION_COLUMNS,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    DataError,
    read_sample_submission,
    read_test_csv,
    read_train_csv,
)
from jaguar_reid.data.splits import assign_closed_folds, assign_grouped_folds, read_folds
from jaguar_reid.keys import SPECS
from jaguar_reid.retrieval.metrics import (
    identity_balanced_map,
    pair_roc_auc,
    per_identity_ap,
    per_query_ap,
)
from jaguar_reid.submission import build_submission, validate_submission, write_submission

# Modest: the whole file runs in seconds on 2 shared cores. The function-scoped tmp_path is
# shared by the examples of one test on purpose: each example overwrites its one file.
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

READERS = {"train": (read_train_csv, TRAIN_COLUMNS), "test": (read_test_csv, TEST_COLUMNS),
           "sample": (read_sample_submission, SUBMISSION_COLUMNS)}


# --------------------------------------------------------------------------- CSV readers

# Characters that make CSVs interesting: separators, quotes, line ends, path parts, blanks.
CSV_ALPHABET = st.sampled_from(list("ab01,\"'\n\r\t ./\\-+e:;#") + ["nan", "inf", "é", "\x00"])
CELL = st.text(st.sampled_from(list(string.ascii_letters + string.digits + " ,\"._-/\\é")),
               max_size=8)


def header_lines(columns) -> st.SearchStrategy[str]:
    """A header that is right, shuffled, missing a column, renamed or repeated."""
    cols = list(columns)
    return st.one_of(
        st.just(",".join(cols)),
        st.permutations(cols).map(",".join),
        st.just(",".join(cols[:-1])),
        st.just(",".join([*cols[:-1], cols[-1].upper()])),
        st.just(",".join([*cols, cols[0]])),
        st.lists(CELL, max_size=4).map(",".join),
    )


@st.composite
def csv_texts(draw, columns) -> str:
    """Mostly CSV-shaped text (a plausible header, rows of odd cells) and sometimes noise."""
    if draw(st.booleans()):
        return draw(st.lists(CSV_ALPHABET, max_size=40).map("".join))
    rows = draw(st.lists(st.lists(CELL, min_size=0, max_size=len(columns) + 1), max_size=6))
    lines = [draw(header_lines(columns))] + [",".join(r) for r in rows]
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))


def check_frame(df: pd.DataFrame, kind: str) -> None:
    """What a reader promises about a frame it returns."""
    _, columns = READERS[kind]
    assert tuple(df.columns) == columns and len(df) > 0
    text_columns = [c for c in columns if c != "row_id"]
    for column in text_columns:
        values = df[column].tolist()
        assert all(isinstance(v, str) and v and v == v.strip() for v in values)
    if "row_id" in columns:
        assert df["row_id"].dtype == np.int64 and df["row_id"].is_unique
    if kind == "train":
        assert df["filename"].is_unique
        assert not df["ground_truth"].str.lower().isin(MISSING_MARKERS).any()
    for column in ("filename", "query_image", "gallery_image"):
        if column in df:
            for name in df[column]:
                assert not Path(name).is_absolute() and ".." not in Path(name).parts


def read_or_data_error(kind: str, path: Path):
    reader, _ = READERS[kind]
    try:
        df = reader(path)
    except DataError as exc:
        assert str(path) in str(exc)  # the file is always named
        return None
    check_frame(df, kind)
    return df


@pytest.mark.parametrize("kind", READERS)
@FUZZ
@given(data=st.data())
def test_any_csv_text_gives_a_checked_frame_or_a_data_error(tmp_path, kind, data):
    text = data.draw(csv_texts(READERS[kind][1]))
    path = tmp_path / f"{kind}.csv"
    path.write_bytes(text.encode("utf-8"))
    read_or_data_error(kind, path)


@pytest.mark.parametrize("kind", [*READERS, "folds"])
@FUZZ
@given(blob=st.binary(max_size=80))
def test_any_bytes_give_a_frame_or_a_data_error(tmp_path, kind, blob):
    path = tmp_path / f"{kind}.csv"
    path.write_bytes(blob)
    if kind == "folds":
        try:
            read_folds(path)
        except DataError as exc:
            assert str(path) in str(exc)
        return
    read_or_data_error(kind, path)


# A name or label as a user could write it: anything printable but a missing-value marker,
# with no blanks at its ends (the readers strip them) and no path parts.
NAME = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                             exclude_characters="/\\"), min_size=1, max_size=12).filter(
    lambda s: s.lower() not in MISSING_MARKERS and s not in (".", "..") and s == s.strip())


def write_rows(path: Path, header, rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode("utf-8"))


@FUZZ
@given(rows=st.lists(st.tuples(NAME, NAME), min_size=1, max_size=8,
                     unique_by=lambda r: r[0]))
def test_valid_train_csv_round_trips(tmp_path, rows):
    path = tmp_path / "train.csv"
    write_rows(path, TRAIN_COLUMNS, rows)
    df = read_train_csv(path)
    assert list(df.itertuples(index=False, name=None)) == rows


@FUZZ
@given(rows=st.lists(st.tuples(st.integers(-(2**53), 2**53), NAME, NAME), min_size=1,
                     max_size=8, unique_by=lambda r: r[0]))
def test_valid_test_csv_round_trips(tmp_path, rows):
    path = tmp_path / "test.csv"
    write_rows(path, TEST_COLUMNS, rows)
    df = read_test_csv(path)
    assert [(int(r), q, g) for r, q, g in df.itertuples(index=False, name=None)] == rows


# --------------------------------------------------------------------------- config

def flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


DEFAULTS = flatten(to_plain(load_config([])))
KEYS = sorted(DEFAULTS)
# Values a user might type for any key: numbers of every shape, booleans, lists, paths, junk.
RAW_VALUE = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "yes", "off", "", " ", "[]", "[1, 2, 3]", "[0.5, 0.5, 0.5]",
                     "[a, b", "{}", "{a: 1}", "~", "null", "1e-4", "0x10", "1_000", "nan", "-inf",
                     "orig", "[orig, flip]", "[zoom9]", "a,b", "a,a", "../x", "!!python/none",
                     "*alias", "&anchor x", "'quoted'", "- item"]),
    st.text(max_size=10),
)


def key_named(message: str, key: str) -> bool:
    return key in message


@FUZZ
@given(key=st.sampled_from(KEYS), raw=RAW_VALUE)
def test_any_override_gives_a_config_or_an_error_naming_the_key(key, raw):
    assume(key != "config")
    try:
        cfg = load_config([f"{key}={raw}"])
    except ConfigError as exc:
        assert key_named(str(exc), key), (key, raw, str(exc))
        return
    assert isinstance(cfg, Config)
    spec, value = SPECS[key], cfg.get_path(key)
    if spec.auto and value == AUTO:
        return
    if spec.kind is list:
        assert isinstance(value, list)
        assert all(isinstance(v, spec.item) for v in value) if spec.item else True
    elif spec.kind in (int, bool):
        assert type(value) is spec.kind
    else:
        assert isinstance(value, spec.kind)


@FUZZ
@given(key=st.sampled_from(KEYS).map(lambda k: k + "x") | st.text(max_size=12),
       raw=RAW_VALUE)
def test_unknown_keys_are_named(key, raw):
    assume("=" not in key and key.strip() and key.strip() not in DEFAULTS
           and key.strip() != "config")
    with pytest.raises(ConfigError) as info:
        load_config([f"{key}={raw}"])
    assert key.strip() in str(info.value)


NUMERIC_KEYS = [k for k in KEYS if SPECS[k].kind in (int, float)]


@FUZZ
@given(key=st.sampled_from(NUMERIC_KEYS), data=st.data())
def test_numbers_round_trip_through_an_override(key, data):
    """A number written as text comes back as that number (or a range error naming the key)."""
    if SPECS[key].kind is int:
        value = data.draw(st.integers(-10**9, 10**9))
    else:
        value = data.draw(st.floats(-1e9, 1e9, allow_nan=False) | st.integers(-1000, 1000))
    try:
        cfg = load_config([f"{key}={value!r}"])
    except ConfigError as exc:
        assert key_named(str(exc), key), (key, value, str(exc))
        return
    assert cfg.get_path(key) == value


# --------------------------------------------------------------------------- metrics


@st.composite
def scored_sets(draw, max_n: int = 9):
    """Labels and an integer-valued similarity matrix: small values, so ties are common."""
    n = draw(st.integers(2, max_n))
    labels = np.array(draw(st.lists(st.sampled_from("abcd"), min_size=n, max_size=n)))
    values = draw(st.lists(st.integers(-20, 20), min_size=n * n, max_size=n * n))
    return np.array(values, dtype=np.float64).reshape(n, n), labels


# Strictly increasing maps that keep distinct integers in [-20, 20] distinct in float64.
MONOTONE = {
    "affine": lambda x: 3.0 * x + 7.0,
    "cube": lambda x: x ** 3,
    "exp": lambda x: np.exp(x / 4.0),
    "arctan": np.arctan,
    "to_unit": lambda x: (x / 20.0 + 1.0) / 2.0,
}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@FUZZ
@given(case=scored_sets(), name=st.sampled_from(sorted(MONOTONE)))
def test_metrics_depend_on_the_ranking_alone(case, name):
    sim, labels = case
    moved = MONOTONE[name](sim)
    assert same(identity_balanced_map(moved, labels), identity_balanced_map(sim, labels))
    assert same(pair_roc_auc(moved, labels), pair_roc_auc(sim, labels))


@FUZZ
@given(case=scored_sets(), data=st.data())
def test_map_ignores_a_rescaling_of_each_query(case, data):
    """Only the order within a query matters: each row may get its own increasing map."""
    sim, labels = case
    names = data.draw(st.lists(st.sampled_from(sorted(MONOTONE)), min_size=len(sim),
                               max_size=len(sim)))
    moved = np.stack([MONOTONE[n](row) for n, row in zip(names, sim, strict=True)])
    np.testing.assert_allclose(per_query_ap(moved, labels), per_query_ap(sim, labels),
                               atol=1e-12, equal_nan=True)
    assert same(identity_balanced_map(moved, labels), identity_balanced_map(sim, labels))


@FUZZ
@given(case=scored_sets())
def test_reversed_scores_give_one_minus_auc(case):
    sim, labels = case
    auc = pair_roc_auc(sim, labels)
    assert same(pair_roc_auc(-sim, labels), 1.0 - auc)


@FUZZ
@given(case=scored_sets())
def test_metrics_agree_with_scikit_learn(case):
    sim, labels = case
    n = len(labels)
    ap = per_query_ap(sim, labels)
    for q in range(n):
        others = np.arange(n) != q
        relevant = labels[others] == labels[q]
        if relevant.any():
            assert ap[q] == pytest.approx(average_precision_score(relevant, sim[q, others]),
                                          abs=1e-12)
        else:
            assert np.isnan(ap[q])
    off = ~np.eye(n, dtype=bool)
    same_id = (labels[:, None] == labels[None, :])[off]
    if same_id.any() and not same_id.all():
        assert pair_roc_auc(sim, labels) == pytest.approx(roc_auc_score(same_id, sim[off]),
                                                          abs=1e-12)
    else:
        assert np.isnan(pair_roc_auc(sim, labels))
    per_identity = per_identity_ap(sim, labels)
    if per_identity:
        assert identity_balanced_map(sim, labels) == pytest.approx(
            np.mean(list(per_identity.values())), abs=1e-12)


@FUZZ
@given(labels=st.lists(st.sampled_from("abcdefgh"), min_size=4, max_size=30),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_folds_keep_their_promises(labels, seed, data):
    """grouped: one fold per identity; closed: every fold used; both: the row order does not
    change any image's fold."""
    labels = np.array(labels)
    assume(len(set(labels.tolist())) >= 2)
    n_folds = data.draw(st.integers(2, min(4, len(set(labels.tolist())))))
    perm = np.random.default_rng(seed).permutation(len(labels))
    grouped = assign_grouped_folds(labels, n_folds, seed)
    for identity in set(labels.tolist()):
        assert len(set(grouped[labels == identity].tolist())) == 1
    assert (assign_grouped_folds(labels[perm], n_folds, seed) == grouped[perm]).all()
    closed = assign_closed_folds(labels, n_folds, seed)
    assert set(closed.tolist()) == set(range(n_folds))


# --------------------------------------------------------------------------- submission

SIMILARITY = st.floats(0.0, 1.0, allow_subnormal=True)


def frame(row_ids, similarity) -> pd.DataFrame:
    test_df = pd.DataFrame({"row_id": row_ids, "query_image": ["q"] * len(row_ids),
                            "gallery_image": ["g"] * len(row_ids)})
    return build_submission(test_df, np.asarray(similarity, dtype=np.float64))


@FUZZ
@given(data=st.data())
def test_written_submission_reads_back(tmp_path, data):
    row_ids = data.draw(st.lists(st.integers(0, 10**9), min_size=1, max_size=30, unique=True))
    similarity = data.draw(st.lists(SIMILARITY, min_size=len(row_ids), max_size=len(row_ids)))
    sub = frame(row_ids, similarity)
    validate_submission(sub, sub, "sample_submission.csv")
    path = tmp_path / "submission.csv"
    write_submission(sub, path)
    back = pd.read_csv(path)
    assert list(back.columns) == ["row_id", "similarity"]
    assert back["row_id"].tolist() == row_ids
    # "%.7f": half a unit in the 7th decimal, plus the float's own rounding.
    assert np.abs(back["similarity"].to_numpy() - np.asarray(similarity)).max() <= 5e-8 + 1e-15
    validate_submission(back, sub, "sample_submission.csv")
    assert not list(tmp_path.glob(".*.tmp*"))


BAD_SIMILARITY = st.one_of(st.just(np.nan), st.just(np.inf), st.just(-np.inf),
                           st.floats(max_value=-5e-324, allow_infinity=False),
                           st.floats(min_value=1.0 + 2**-52, allow_infinity=False))


@FUZZ
@given(data=st.data())
def test_invalid_similarity_is_refused_naming_the_row(data):
    n = data.draw(st.integers(1, 20))
    similarity = data.draw(st.lists(SIMILARITY, min_size=n, max_size=n))
    where = data.draw(st.integers(0, n - 1))
    similarity[where] = data.draw(BAD_SIMILARITY)
    sub = frame(list(range(n)), similarity)
    with pytest.raises(DataError, match=rf"submission row {where} \(row_id {where}\)"):
        validate_submission(sub, frame(list(range(n)), [0.5] * n), "sample_submission.csv")


@FUZZ
@given(data=st.data())
def test_rows_out_of_the_sample_order_are_refused(data):
    expected = data.draw(st.lists(st.integers(0, 1000), min_size=1, max_size=20, unique=True))
    got = data.draw(st.one_of(st.permutations(expected),
                              st.lists(st.integers(0, 1000), max_size=21, unique=True)))
    assume(list(got) != expected)
    sub = frame(list(got), [0.5] * len(got))
    with pytest.raises(DataError, match="sample_submission.csv"):
        validate_submission(sub, frame(expected, [0.5] * len(expected)), "sample_submission.csv")
