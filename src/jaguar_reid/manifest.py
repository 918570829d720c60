"""The manifest of an exported experiment: every file's relative path, size and sha256.

`python -m jaguar_reid.export` writes `manifest.json` last into the folder it makes;
`submit.py` checks a model folder that has one before it computes or writes anything, so a
copy that lost, truncated or changed a file on its way to another machine (an interrupted
upload, a dataset version mixed with another) stops with the files named instead of
submitting from damaged weights. An experiment read from elsewhere (`models=PATH`) must have
one unless `models_verify=false`; the training output folder itself has none. Files that the
manifest does not list are ignored: a work folder may share the folder. The manifest catches
damage and mixed copies, not a deliberate edit: it is not signed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from jaguar_reid import layout
from jaguar_reid.io_utils import UserInputError, atomic_write_json, read_json

MANIFEST_FORMAT = 1
_CHUNK = 8 << 20  # hashed 8 MiB at a time: a 1.2 GB weights file never sits in memory


class ManifestError(UserInputError):
    """An exported experiment's files disagree with its manifest; the message lists them."""


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def listed_files(folder: str | Path) -> list[Path]:
    """Every file beneath `folder` but the manifest itself, sorted by relative path."""
    folder = Path(folder)
    return sorted((p for p in folder.rglob("*") if p.is_file() and p != folder / layout.MANIFEST),
                  key=lambda p: p.relative_to(folder).as_posix())


def write_manifest(folder: str | Path, extra: Mapping[str, Any]) -> Path:
    """Write `folder/manifest.json` (atomically): `extra` (commit, versions, settings...),
    the creation time (UTC) and every other file's relative path, size and sha256."""
    folder = Path(folder)
    files = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
              "sha256": file_sha256(p)} for p in listed_files(folder)]
    doc = {"format": MANIFEST_FORMAT, **extra,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "files": files}
    path = folder / layout.MANIFEST
    atomic_write_json(path, doc)
    return path


def _read(path: Path) -> list[Mapping[str, Any]]:
    try:
        doc = read_json(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc}); copy the exported "
                            "experiment again") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and {"path", "size", "sha256"}
                                              <= set(f) for f in files):
        raise ManifestError(f"{path}: not a manifest of this pipeline (expected a 'files' list "
                            "of path, size and sha256); copy the exported experiment again")
    return files


def _problem(folder: Path, entry: Mapping[str, Any]) -> str | None:
    """What is wrong with one listed file, or None."""
    rel = PurePosixPath(str(entry["path"]))
    if rel.is_absolute() or ".." in rel.parts:  # a manifest only speaks of its own folder
        return f"{rel}: not a path inside the folder"
    path = folder / rel
    if not path.is_file():
        return f"{rel}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{rel}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)"
    if file_sha256(path) != entry["sha256"]:
        return f"{rel}: content changed (sha256 differs from the manifest's)"
    return None


def verify_manifest(folder: str | Path, required: bool = False) -> int | None:
    """Check every file `folder/manifest.json` lists for its size and sha256; raise one
    `ManifestError` naming the folder and every bad file. Returns the number of files
    checked, or None when the folder has no manifest (a plain experiment folder), which is an
    error when one is `required` (an experiment read from elsewhere: models=PATH)."""
    folder = Path(folder)
    path = folder / layout.MANIFEST
    if required and not folder.is_dir():
        raise ManifestError(f"{folder}: no such experiment folder (models=PATH names the "
                            "experiment's folder, or a folder holding <exp>/ folders)")
    if not path.is_file() and required:
        raise ManifestError(
            f"{folder}: no {layout.MANIFEST}; an exported experiment carries one (python -m "
            "jaguar_reid.export) and models=PATH reads only what it can check. A training "
            "folder copied by hand has none: add models_verify=false to read it unchecked")
    if not path.is_file():
        return None
    files = _read(path)
    problems = [p for p in (_problem(folder, e) for e in files) if p]
    if problems:
        raise ManifestError(
            f"{folder}: {len(problems)} of the {len(files)} files of this exported experiment "
            f"do not match its {layout.MANIFEST}: " + "; ".join(problems)
            + ". Copy the export again (or export it again: python -m jaguar_reid.export)")
    return len(files)
