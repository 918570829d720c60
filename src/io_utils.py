"""Small shared helpers: atomic writes, device choice, seeding, JSON."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class UserInputError(ValueError):
    """A config, CSV or file a user gave that cannot be used; the message says which and why."""


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run a command-line entry point: a user's mistake prints one clear line, not a traceback."""
    import sys

    try:
        main(sys.argv[1:] if argv is None else argv)
    except (UserInputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`.

    A run that dies while writing leaves the previous file untouched and at worst a stray
    temporary file (named `.<name>.*.tmp`) beside it. `suffix` keeps a file type visible to
    writers that look at the extension (numpy adds `.npz` otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}",
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def resolve_device(name: str) -> str:
    """`auto` picks CUDA when present; an explicit CUDA request without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} asked for, but torch sees no CUDA device; "
                           "use device=cpu or device=auto")
    return name


def amp_dtype(device: str, enabled: bool):
    """Autocast dtype: bf16 on GPUs that have it, else fp16; None (full fp32) on the CPU."""
    import torch

    if not (enabled and device.startswith("cuda")):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    # Legacy global state: third-party augmentations still draw from it.
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)
