"""The photos to identify: files and folders on the command line become a list of files, and
each file becomes the model's input image, or one line saying why it cannot.

A folder is searched beneath for image files (by extension, hidden files skipped); a file
named on its own is taken whatever its extension, so a photo without one is read too (and
named as a bad file if it is not an image). Decoding goes through the one decoder of the
pipeline (`data.images.decode_image`: EXIF orientation, alpha masks, 16-bit, the pixel limit);
a file it refuses is a `Refused` with its reason, never an exception for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from jaguar_reid.data.csv_tables import IMAGE_EXTENSIONS
from jaguar_reid.io_utils import UserInputError

READ_THREADS = 4  # decoding releases the GIL; more threads than this gain little on a laptop


class PhotoInputError(UserInputError):
    """A path given to identify that is not there or holds no photo."""


@dataclass(frozen=True)
class Refused:
    """A photo that cannot be read, and why (`<path>: <problem>`)."""

    message: str


def collect_photos(inputs: Iterable[str | Path]) -> list[Path]:
    """Every photo the inputs name, in order (a folder's photos sorted by path), each once."""
    out: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            named = sorted(p for p in path.rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in
                                       p.relative_to(path).parts))
            for p in named:
                if p.is_symlink() and not p.exists():
                    print(f"skipped {p}: a link to a file that is not there")
            found = [p for p in named if p.is_file()]
            if not found:
                print(f"{path}: no photo ({', '.join(IMAGE_EXTENSIONS)}) beneath it")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise PhotoInputError(f"{path}: no such file or folder (give photos or folders of "
                                  "photos)")
    if not out:
        raise PhotoInputError("no photo to identify in "
                              + ", ".join(str(p) for p in inputs))
    return list(dict.fromkeys(out))


def read_photos(paths: Sequence[Path], load: Callable[[Path], object]) -> list[object]:
    """`load(path)` of each photo (threads), or a `Refused` where the decoder refuses it."""
    from jaguar_reid.data.images import ImageError

    def one(path: Path) -> object:
        try:
            return load(path)
        except ImageError as exc:
            return Refused(str(exc))

    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(paths)))) as pool:
        return list(pool.map(one, paths))
