"""A fold's files while it trains: the resumable checkpoint, weights and the epoch log, each
written so that a run killed at any moment leaves the previous complete version."""

from __future__ import annotations

import csv
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from jaguar_reid.config import METRICS, ConfigError
from jaguar_reid.io_utils import atomic_path, explain_disk_full
from jaguar_reid.training.model import RETRIEVAL_MODES

LOG_FIELDS = ["epoch", "loss", "lr", "pair_auc", "map",
              *[f"{m}_{k}" for k in RETRIEVAL_MODES for m in METRICS],
              "images_per_s", "seconds"]


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a kill during the write leaves the previous checkpoint in place."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    """Tensors, numbers, strings and containers only: `weights_only=True` never runs code
    from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message spans lines and suggests weights_only=False: never for a file
        # that may run code.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise ConfigError(f"{path}: unreadable checkpoint: it holds objects other than tensors, "
                          f"numbers and strings{what}, which could run code, so it was not "
                          "read; delete it to start the fold again") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {first}); "
                          "delete it to start the fold again") from None


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))


def write_log(path: Path, rows: list[dict]) -> None:
    """The whole log, atomically (a resumed fold drops rows past its checkpoint)."""
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def append_log(path: Path, row: dict) -> None:
    # One short line per epoch, so a run that dies keeps its history. A line cut short (kill,
    # full disk) is dropped on resume: the log is rewritten from the checkpoint's history.
    new = not path.exists()
    with explain_disk_full(path, "its earlier rows are kept and the checkpoint is intact"), \
            open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
