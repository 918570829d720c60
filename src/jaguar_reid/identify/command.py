"""`jaguar-reid identify PHOTO_OR_FOLDER ... models=PATH [exp=NAME] [key=value ...]`: which
known individual each photo shows, or a new one.

`models=PATH` is an exported experiment (or a training folder, with models_verify=false), read
with its own saved config unless `config=` is given; it must have been calibrated (python -m
jaguar_reid.identify.calibrate). Folders are searched beneath for photos. Writes
`identify.csv` and `identify.html` together into `identify.out` (default
`<output_dir>/<exp>/identify/`); a photo that cannot be read is named on one line, listed as an
error in both, and the others are identified. The same code as `Identifier` (the Python API).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from jaguar_reid.commit import commit_together, finish_commits
from jaguar_reid.identify import files
from jaguar_reid.identify.csv_output import write_csv
from jaguar_reid.identify.html_output import PageFacts, render_page
from jaguar_reid.identify.identifier import (
    ERROR,
    KNOWN,
    Identification,
    Identifier,
    identify_config,
    timed_identify,
)
from jaguar_reid.identify.photos import PhotoInputError, collect_photos

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")  # key=value, as opposed to a photo's path
USAGE = "jaguar-reid identify PHOTO_OR_FOLDER ... models=PATH [key=value ...]"


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(photos and folders, key=value arguments): an argument that names an existing file or
    folder is a photo even when it holds '='."""
    photos, keys = [], []
    for arg in argv:
        (keys if _KEY.match(arg) and not Path(arg).exists() else photos).append(arg)
    return photos, keys


def write_results(identifier: Identifier, records: Sequence[Identification],
                  seconds: float | None) -> tuple[Path, Path]:
    """identify.csv and identify.html, together or not at all."""
    cfg = identifier.cfg
    folder = files.results_dir(cfg)
    finish_commits(folder, files.COMMIT_NAME)
    csv_path, html_path = folder / files.RESULTS_CSV, folder / files.RESULTS_HTML
    facts = PageFacts(f"Identification: {cfg.exp}", seconds)
    page = render_page(records, identifier, facts)
    top_k = min(cfg.identify.top_k, len(identifier.classes))  # no columns for no one
    commit_together({
        csv_path: lambda p: write_csv(records, p, top_k, cfg.identify.local),
        html_path: lambda p: p.write_text(page, encoding="utf-8", errors="backslashreplace"),
    }, files.COMMIT_NAME)
    return csv_path, html_path


def config_arguments(argv: list[str]) -> list[str]:
    """The key=value arguments alone (`jaguar-reid identify --print-config`)."""
    return split_args(argv)[1]


def main(argv: list[str]) -> list[Identification]:
    inputs, args = split_args(argv)
    if not inputs:
        raise PhotoInputError(f"name the photos or folders to identify: {USAGE}")
    photos = collect_photos(inputs)
    identifier = Identifier.from_config(identify_config(args))
    records, seconds = timed_identify(identifier, photos)
    for record in records:
        if record.verdict == ERROR:
            print(f"skipped {record.error}")
    csv_path, html_path = write_results(identifier, records, seconds)
    known = sum(r.verdict == KNOWN for r in records)
    errors = sum(r.verdict == ERROR for r in records)
    print(f"{len(records)} photos: {known} known, {len(records) - known - errors} new "
          f"individual, {errors} not read; {seconds:.1f} s ({seconds / len(records):.3f} s per "
          f"photo on {identifier.device})")
    print(f"wrote {csv_path} and {html_path}")
    return records


if __name__ == "__main__":
    from jaguar_reid.cli import run_step

    run_step("identify")
