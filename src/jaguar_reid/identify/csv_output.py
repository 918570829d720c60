"""identify.csv: one row per photo.

Columns: `photo` (the path as given), `verdict` (known | new | error), `identity` (the named
individual when known), `new_probability` (P(a new individual); empty where the calibration
had no new-individual queries), `known_score` (the calibrated score the threshold reads), then
for each of the top `identify.top_k` candidates k = 1, 2, ...: `identity_k`, `probability_k`
(P(it is that individual)), `similarity_k` (cosine) and `gallery_photo_k` (its closest gallery
photo), with `identify.local` also `inliers_k`; last, `error` (why a photo could not be read).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from jaguar_reid.identify.identifier import Identification

CANDIDATE_FIELDS = ("identity", "probability", "similarity", "gallery_photo")


def header(top_k: int, local: bool) -> list[str]:
    fields = [*CANDIDATE_FIELDS, "inliers"] if local else list(CANDIDATE_FIELDS)
    return (["photo", "verdict", "identity", "new_probability", "known_score"]
            + [f"{f}_{k}" for k in range(1, top_k + 1) for f in fields] + ["error"])


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def row(record: Identification, top_k: int, local: bool) -> list[str]:
    out = [str(record.photo), record.verdict, record.identity or "",
           _number(record.new_probability), _number(record.known_score)]
    for k in range(top_k):
        if k < len(record.candidates):
            c = record.candidates[k]
            out += [c.identity, _number(c.probability), _number(c.similarity), c.gallery_photo]
            if local:
                out.append("" if c.inliers is None else str(c.inliers))
        else:
            out += [""] * (len(CANDIDATE_FIELDS) + local)
    return out + [record.error or ""]


def write_csv(records: Sequence[Identification], path: Path, top_k: int, local: bool) -> None:
    # A file name that is not valid UTF-8 (a camera's Latin-1 name) is written escaped.
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        writer = csv.writer(handle)
        writer.writerow(header(top_k, local))
        writer.writerows(row(r, top_k, local) for r in records)
