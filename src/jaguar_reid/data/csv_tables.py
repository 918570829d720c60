"""Competition files: CSV readers and finding the images they name beneath the data folder.

Errors name the file and the row (row numbers are the CSV's own line numbers, header = line 1),
so a user can open the file and look.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from jaguar_reid.io_utils import UserInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TRAIN_COLUMNS = ("filename", "ground_truth")
TEST_COLUMNS = ("row_id", "query_image", "gallery_image")
SUBMISSION_COLUMNS = ("row_id", "similarity")
PSEUDO_COLUMNS = ("filename", "identity", "confidence")
# Texts that pandas (and spreadsheets) write for a missing value: as a label they almost surely
# mean "unknown", and reading them as an identity called "NaN" would train a fake jaguar.
MISSING_MARKERS = frozenset({"nan", "-nan", "none", "null", "na", "n/a", "<na>", "#n/a",
                             "#n/a n/a", "#na", "1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan"})
# Larger ids are not whole numbers a float holds exactly; no competition file has them.
_MAX_ID = 2**53


class DataError(UserInputError):
    """Input data that cannot be used; the message names the file and row."""


def _line(index: int) -> int:
    """DataFrame index -> line number in the CSV (header is line 1)."""
    return int(index) + 2


def _long_line(path: Path, n_header: int) -> str:
    """Where a row has more fields than the header ("line N: M fields"), for the error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            for row in reader:
                if len(row) > n_header:
                    return f"line {reader.line_num}: {len(row)} fields"
    except (csv.Error, UnicodeDecodeError):
        pass
    return "a row has more fields than the header"


def _not_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 lies: 'byte 0xe9 on line 3'."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        newline = b"\n"
        return f"byte {data[exc.start]:#04x} on line {data.count(newline, 0, exc.start) + 1}"
    return "a byte pandas could not decode"


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            # pandas would take a row with one field too many as an index column and shift every
            # value one column left; with index_col=False it warns and drops the extra field.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserWarning as exc:
        header = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=0).columns
        raise DataError(f"{path}: {_long_line(path, len(header))}, but the header has "
                        f"{len(header)} ({', '.join(header)}); quote values that hold commas"
                        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({_not_utf8(path)}); save it as UTF-8"
                        ) from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not a readable CSV: {str(exc).strip()}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file, expected columns {', '.join(columns)}") from exc
    # pandas renames a repeated header name to `name.1`; which copy is meant is a guess.
    header = pd.read_csv(path, dtype=str, keep_default_na=False, header=None, nrows=1,
                         index_col=False).iloc[0].str.strip().tolist()
    repeated = sorted({c for c in header if c in columns and header.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the "
                        "header")
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}, "
            f"found {', '.join(df.columns)}"
        )
    df = df[list(columns)].copy()
    for column in columns:
        df[column] = df[column].str.strip()
        empty = df.index[df[column] == ""]
        if len(empty):
            raise DataError(f"{path}: row {_line(empty[0])}: empty value in column '{column}'")
    return df


def _check_filenames(path: Path, df: pd.DataFrame, column: str) -> None:
    for index, name in df[column].items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise DataError(
                f"{path}: row {_line(index)}: {column} {name!r} must be a file name inside the "
                "data folder (no absolute paths, no '..')"
            )


def _to_int_column(path: Path, df: pd.DataFrame, column: str) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce")
    as_float = values.astype(np.float64)
    # `inf` and `1e30` parse as numbers; cast to int64 they would crash or wrap around silently.
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float)) | (np.abs(as_float) > _MAX_ID)
    if bad.any():
        index = df.index[bad][0]
        raise DataError(f"{path}: row {_line(index)}: {column} must be an integer, "
                        f"got {df.at[index, column]!r}")
    return values.astype(np.int64)


def read_train_csv(path: str | Path) -> pd.DataFrame:
    """`train.csv` -> DataFrame[filename, ground_truth]; one row per image, names unique."""
    path = Path(path)
    df = _read_csv(path, TRAIN_COLUMNS)
    if df.empty:
        raise DataError(f"{path}: no rows")
    _check_filenames(path, df, "filename")
    # `a.png` and `./a.png` are one file: twice in train.csv it could land on both sides of a
    # fold and leak.
    dup = df.index[df["filename"].map(lambda name: Path(name).as_posix()).duplicated()]
    if len(dup):
        raise DataError(f"{path}: row {_line(dup[0])}: filename {df.at[dup[0], 'filename']!r} "
                        "appears more than once")
    missing = df.index[df["ground_truth"].str.lower().isin(MISSING_MARKERS)]
    if len(missing):
        raise DataError(f"{path}: row {_line(missing[0])}: ground_truth "
                        f"{df.at[missing[0], 'ground_truth']!r} marks a missing label; expected "
                        "an identity name (remove unlabelled images from the file)")
    return df.reset_index(drop=True)


def read_pseudo_csv(path: str | Path) -> pd.DataFrame:
    """`pseudo.csv` (python -m jaguar_reid.pseudo) -> DataFrame[filename, identity,
    confidence (float)]: test images with the training identity given to them, each once."""
    path = Path(path)
    df = _read_csv(path, PSEUDO_COLUMNS)
    _check_filenames(path, df, "filename")
    dup = df.index[df["filename"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: row {_line(dup[0])}: filename {df.at[dup[0], 'filename']!r} "
                        "appears more than once")
    conf = pd.to_numeric(df["confidence"], errors="coerce").astype(np.float64)
    bad = df.index[~((conf >= 0.0) & (conf <= 1.0))]
    if len(bad):
        raise DataError(f"{path}: row {_line(bad[0])}: confidence must be a number in [0, 1], "
                        f"got {df.at[bad[0], 'confidence']!r}")
    df["confidence"] = conf
    return df.reset_index(drop=True)


def _read_rows(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """A CSV keyed by row_id: not empty, row_ids whole numbers, each once."""
    df = _read_csv(path, columns)
    if df.empty:
        raise DataError(f"{path}: no rows")
    df["row_id"] = _to_int_column(path, df, "row_id")
    _check_unique_ids(path, df)
    return df


def read_test_csv(path: str | Path) -> pd.DataFrame:
    """`test.csv` -> DataFrame[row_id (int), query_image, gallery_image]."""
    path = Path(path)
    df = _read_rows(path, TEST_COLUMNS)
    _check_filenames(path, df, "query_image")
    _check_filenames(path, df, "gallery_image")
    return df


def _check_unique_ids(path: Path, df: pd.DataFrame) -> None:
    dup = df.index[df["row_id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: row {_line(dup[0])}: row_id {df.at[dup[0], 'row_id']} "
                        "appears more than once")


def read_sample_submission(path: str | Path) -> pd.DataFrame:
    """`sample_submission.csv` -> DataFrame[row_id (int), similarity (str)]; only row_ids matter."""
    return _read_rows(Path(path), SUBMISSION_COLUMNS)


def pair_image_names(test_df: pd.DataFrame) -> list[str]:
    """Every image a test pair names, in order of first appearance (queries first)."""
    return list(dict.fromkeys([*test_df["query_image"], *test_df["gallery_image"]]))


def index_images(root: str | Path) -> dict[str, list[Path]]:
    """Every image file beneath `root`, keyed by file name (Kaggle nests `train/train/`)."""
    root = Path(root)
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Our own outputs never hold source images; skipping hidden folders avoids caches.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                index.setdefault(name, []).append(Path(dirpath) / name)
    return index


def outside_root(root: str | Path, path: str | Path) -> Path | None:
    """Where `path` really leads (symbolic links followed) when that is outside `root`;
    None when it stays inside."""
    real = Path(os.path.realpath(path))
    return None if real.is_relative_to(Path(os.path.realpath(root))) else real


def resolve_image_paths(root: str | Path, names: Iterable[str], csv_path: str | Path,
                        index: dict[str, list[Path]] | None = None) -> list[Path]:
    """Map each CSV file name to one image file beneath `root`.

    A name with a folder part (`train/x.png`) is taken relative to `root`; a bare name is looked
    up anywhere beneath it. Missing or ambiguous names are errors that name the CSV, and so is
    a file whose symbolic links lead outside `root`: the CSVs are not trusted to choose what
    is read.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.dir {str(root)!r} is not a folder")
    names = list(names)
    if index is None:
        index = index_images(root)
    paths: list[Path] = []
    missing: list[str] = []
    for name in names:
        path = None
        if Path(name).parent != Path("."):
            candidate = root / name
            if candidate.is_file():
                path = candidate
        if path is None:
            found = index.get(Path(name).name, [])
            if not found:
                missing.append(name)
                continue
            if len(found) > 1:
                shown = ", ".join(str(p) for p in found[:3])
                raise DataError(f"{csv_path}: image {name!r} is found more than once beneath "
                                f"{root}: {shown}; keep one copy")
            path = found[0]
        real = outside_root(root, path)
        if real is not None:
            raise DataError(f"{csv_path}: image {name!r} is {path}, which leads to {real}, "
                            f"outside the data folder {root}; copy the image into it")
        paths.append(path)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{csv_path}: {len(missing)} image(s) not found beneath {root}: "
                        f"{shown}{more}")
    return paths
