"""What every cache knows a source image by: the sha256 of its bytes, never its name or path.

A name says nothing about the pixels: the competition's two rounds hold the same file names
with other pictures, and a file can be rewritten in place (`cp -p` keeps its size and mtime).
So each cache entry (preprocessed image, floor embedding, local features, pair counts, teacher
embeddings) is keyed by the content of its sources and the settings that shape it.

Hashing reads every byte (~20 ms for a 6 MB photo), so a digest is remembered in
`<output_dir>/cache/source_ids.json` and reused while the file's `Stamp` (size, mtime, ctime,
inode, device) is unchanged. The shortcut is safe because the kernel sets ctime on every
write, rename-over and utime, and no user can set it back (`os.utime` restores mtime, not
ctime; only changing the system clock could); inode and device catch a file replaced by
another. A rewrite in the same clock tick as the stat that preceded hashing could keep ctime,
so a digest is trusted only when ctime is older than the hashing by `RACY_NS` (git's "racily
clean" rule): such a file is hashed again next time. Not covered, and accepted: a system
clock set back, or a file system whose ctime does not move on write (Windows reports creation
time as ctime; some FUSE or network mounts). Delete the file above to hash everything again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path

from jaguar_reid import layout
from jaguar_reid.config import Config
from jaguar_reid.data.images import ImageError
from jaguar_reid.io_utils import DiskFullError, atomic_write_text, file_lock, say_once
from jaguar_reid.manifest import file_sha256

# ctime this close to the hashing may share its clock tick with a later write: twice the
# coarsest timestamps in use (FAT's 2 s is coarser still: such a file is hashed every time).
RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class Stamp:
    """What a file's stat says about its version."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str | Path) -> Stamp:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


@dataclass(frozen=True)
class Remembered:
    """A file's digest, the stamp it had and when its hashing began (wall clock, ns)."""

    stamp: Stamp
    hashed_ns: int
    sha256: str

    def vouches_for(self, stamp: Stamp) -> bool:
        return self.stamp == stamp and stamp.ctime_ns + RACY_NS <= self.hashed_ns


def hash_file(path: str | Path) -> Remembered | None:
    """The file's digest now; None when it is not there."""
    started = time.time_ns()
    try:
        before = Stamp.of(path)
        digest = file_sha256(path)
        after = Stamp.of(path)
    except FileNotFoundError:
        return None
    # Written while read: the digest is of neither version, so it is never vouched for.
    return Remembered(after, started if before == after else 0, digest)


def _memo_path(cfg: Config) -> Path:
    return layout.cache_root(cfg) / layout.SOURCE_IDS


def _read_memo(path: Path) -> dict[str, Remembered]:
    """The remembered digests; a damaged file is forgotten (it only saves hashing)."""
    try:
        raw = json.loads(path.read_text())
        return {key: Remembered(Stamp(*row[:5]), int(row[5]), str(row[6]))
                for key, row in raw.items()}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError, IndexError):
        return {}


def _remember(path: Path, new: dict[str, Remembered]) -> None:
    """Add `new` to the memo under its lock (another run may have added entries). A memo that
    cannot be written (a read-only output folder, a full disk) only costs hashing again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_name(path.name + ".lock")):
            merged = {**_read_memo(path), **new}
            rows = {key: [*astuple(r.stamp), r.hashed_ns, r.sha256]
                    for key, r in merged.items()}
            atomic_write_text(path, json.dumps(rows) + "\n")
    except (OSError, DiskFullError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the disk is full"
        say_once(f"note: {path}: cannot remember the files' digests there ({reason}); they "
                 "are read again next time")


def content_ids(cfg: Config, paths: Sequence[str | Path],
                workers: int | None = None) -> list[str | None]:
    """The sha256 of each file's bytes (None for a file that is not there): remembered where
    its stamp vouches for it, else read, in `workers` threads (hashing releases the GIL;
    default: the CPU count, at most 8)."""
    workers = workers or min(8, os.cpu_count() or 1)
    memo_path = _memo_path(cfg)
    memo = _read_memo(memo_path)
    keys = [str(Path(p).resolve()) for p in paths]
    known: dict[str, Remembered | None] = {}
    for key in keys:
        entry = memo.get(key)
        try:
            if entry is not None and entry.vouches_for(Stamp.of(key)):
                known[key] = entry
        except FileNotFoundError:
            known[key] = None
    todo = list(dict.fromkeys(k for k in keys if k not in known))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        known.update(zip(todo, pool.map(hash_file, todo), strict=True))
    fresh = {k: known[k] for k in todo if known[k] is not None and known[k].hashed_ns > 0}
    if fresh:
        _remember(memo_path, fresh)
    return [None if known[k] is None else known[k].sha256 for k in keys]


def require_ids(cfg: Config, paths: Sequence[str | Path],
                workers: int | None = None) -> list[str]:
    """`content_ids` of files that must be there: a missing one is an `ImageError` naming it."""
    ids = content_ids(cfg, paths, workers)
    for path, digest in zip(paths, ids, strict=True):
        if digest is None:
            raise ImageError(f"{path}: missing", "missing")
    return [str(d) for d in ids]


def ids_digest(ids: Sequence[str]) -> str:
    """One digest of an ordered list of content ids (a cache of several images' rows)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()
