"""Copy a data folder with a share of its identities held out of `train.csv` entirely:

    python tools/hold_out.py SRC DST --share 0.2 --seed 0

DST gets the same images, `test.csv`, `sample_submission.csv` and (if present)
`test_labels.csv`; its `train.csv` drops every row of the held-out identities, whose names are
written to `DST/heldout.txt`. Training on DST and querying the test photos then checks the
"new individual" verdict of `jaguar-reid identify` on individuals no model or gallery has seen.
The choice is seeded, so the same SRC, share and seed hold out the same identities.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

COPIED_TABLES = ("test.csv", "sample_submission.csv", "test_labels.csv")
IMAGE_FOLDERS = ("train", "test")


def held_out_identities(identities: list[str], share: float, seed: int) -> list[str]:
    """The sorted identities to hold out: round(share * n), at least one, never all."""
    ids = np.array(sorted(set(identities)))
    count = min(max(1, round(share * len(ids))), len(ids) - 1)
    return sorted(np.random.default_rng(seed).choice(ids, count, replace=False).tolist())


def hold_out(src: Path, dst: Path, share: float, seed: int) -> list[str]:
    """Write the copy; return the held-out identities."""
    train = pd.read_csv(src / "train.csv", dtype=str, keep_default_na=False)
    held = held_out_identities(train["ground_truth"].tolist(), share, seed)
    dst.mkdir(parents=True, exist_ok=True)
    for name in IMAGE_FOLDERS:
        shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
    for name in COPIED_TABLES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    train[~train["ground_truth"].isin(held)].to_csv(dst / "train.csv", index=False)
    (dst / "heldout.txt").write_text("\n".join(held) + "\n")
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a data folder (train.csv, train/, test/, ...)")
    parser.add_argument("dst", type=Path, help="the copy to write (must not be SRC)")
    parser.add_argument("--share", type=float, default=0.2, help="share of identities held out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.share < 1:
        print(f"error: --share {args.share}: expected a share between 0 and 1", file=sys.stderr)
        return 2
    if not (args.src / "train.csv").is_file():
        print(f"error: {args.src / 'train.csv'}: not found; expected a data folder",
              file=sys.stderr)
        return 2
    if args.dst.resolve() == args.src.resolve():
        print(f"error: {args.dst}: the copy must not be the data folder itself", file=sys.stderr)
        return 2
    held = hold_out(args.src, args.dst, args.share, args.seed)
    print(f"{args.dst}: {len(held)} identities held out of train.csv: {', '.join(held)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
