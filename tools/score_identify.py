"""Score the CSV of `jaguar-reid identify` against the true identities of its photos:

    python tools/score_identify.py IDENTIFY_CSV --labels test_labels.csv --known train.csv

A photo is of a known individual when its true identity is in KNOWN's `ground_truth` (the
training table the gallery came from), of a new one otherwise. Prints the rates that
`identify.md` promises out of fold, measured on these photos, as a Markdown table. Photos are
matched to LABELS' `filename` by file name; photos the command could not read are counted apart.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Rates:
    """Shares of the known and of the new photos; NaN where there are none."""

    known: int
    new: int
    top1_right: float
    named_right: float
    named_wrong: float
    known_called_new: float
    new_called_new: float
    new_named: float


def share(mask: np.ndarray, among: np.ndarray) -> float:
    return float(mask[among].mean()) if among.any() else float("nan")


def rates(truth: np.ndarray, verdict: np.ndarray, named: np.ndarray, top1: np.ndarray,
          known_ids: set[str]) -> Rates:
    """Array in, rates out: truth/named/top1 identities, verdict 'known'|'new' per photo."""
    is_known = np.isin(truth, sorted(known_ids))
    called_new = verdict == "new"
    return Rates(known=int(is_known.sum()), new=int((~is_known).sum()),
                 top1_right=share(top1 == truth, is_known),
                 named_right=share(~called_new & (named == truth), is_known),
                 named_wrong=share(~called_new & (named != truth), is_known),
                 known_called_new=share(called_new, is_known),
                 new_called_new=share(called_new, ~is_known),
                 new_named=share(~called_new, ~is_known))


def table(r: Rates) -> str:
    rows = [("known individual: top candidate right (no threshold)", r.top1_right),
            ("known individual: named right", r.named_right),
            ("known individual: named wrong", r.named_wrong),
            ("known individual: called new", r.known_called_new),
            ("new individual: called new", r.new_called_new),
            ("new individual: given a known name", r.new_named)]
    lines = ["| on these photos | share |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in rows]
    return "\n".join(lines) + f"\n\n{r.known} photos of known individuals, {r.new} of new ones."


def load(csv: Path, labels: Path, known: Path) -> tuple[pd.DataFrame, set[str], int]:
    out = pd.read_csv(csv, dtype=str, keep_default_na=False)
    truth = pd.read_csv(labels, dtype=str, keep_default_na=False)
    names = out["photo"].map(lambda p: Path(p).name)
    if names.duplicated().any():
        raise ValueError(f"{csv}: two photos named {names[names.duplicated()].iloc[0]}")
    label_of = dict(zip(truth["filename"].map(lambda p: Path(p).name), truth["ground_truth"],
                        strict=True))
    missing = sorted(set(names) - set(label_of))
    if missing:
        raise ValueError(f"{labels}: no row for {missing[0]} ({len(missing)} photos in all)")
    out["truth"] = names.map(label_of)
    unread = out["error"] != ""
    known_ids = set(pd.read_csv(known, dtype=str, keep_default_na=False)["ground_truth"])
    return out[~unread], known_ids, int(unread.sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="identify.csv written by jaguar-reid identify")
    parser.add_argument("--labels", type=Path, required=True, help="filename,ground_truth")
    parser.add_argument("--known", type=Path, required=True,
                        help="the training table whose identities are the known ones")
    args = parser.parse_args(argv)
    try:
        out, known_ids, unread = load(args.csv, args.labels, args.known)
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r = rates(out["truth"].to_numpy(), out["verdict"].to_numpy(), out["identity"].to_numpy(),
              out["identity_1"].to_numpy(), known_ids)
    print(table(r) + (f" {unread} photos not read." if unread else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
