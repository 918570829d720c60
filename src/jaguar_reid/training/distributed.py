"""Several processes for one run: data-parallel folds through torchrun, or folds side by side.

`bash train.sh fold=0 gpus=N` re-launches training under `torchrun` with N processes
(DistributedDataParallel; NCCL on CUDA, gloo on CPU); `bash train.sh fold=0..4 gpus=N
parallel=folds` runs up to N single-process folds at once, each on a GPU of its own. In both cases
the parent prepares the shared inputs (image cache, folds file) first, so the children only read
them, and only rank 0 of a data-parallel run writes anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from jaguar_reid.io_utils import UserInputError
from jaguar_reid.keys import choices
from jaguar_reid.layout import PACKAGE_PARENT
from jaguar_reid.progress import PROGRESS_ENV
from jaguar_reid.progress import shown as progress_shown
from jaguar_reid.training.child_output import say, start_pump

# Set by the launcher in a fold-parallel child: train its fold, leave the experiment report to
# the parent.
PARALLEL_MODES = choices("parallel")  # with gpus > 1
CHILD_ENV = "REID_FOLD_CHILD"
TRAIN_MODULE = "jaguar_reid.train"  # the command the launchers start (by name: no import)
_OUTPUT_GRACE_S = 10.0  # after a child ends, the wait for the rest of its output


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def is_main() -> bool:
    return world()[0] == 0


def init(device: str) -> str:
    """Join the torchrun process group; returns this rank's device."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision (early stop) to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([int(flag)])
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def _child_env(**extra: str) -> dict[str, str]:
    # The children import this copy of the package, wherever they are started from.
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{PACKAGE_PARENT}{os.pathsep + path if path else ''}",
            **extra}


def launch_data_parallel(argv: Sequence[str], n_proc: int) -> None:
    """Run `python -m jaguar_reid.train argv` under torchrun, `n_proc` processes here."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n_proc}", "-m", TRAIN_MODULE, *argv]
    print(f"launching {n_proc} data-parallel processes: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, check=False, env=_child_env())
    if result.returncode == 2:  # a user's mistake, said by the processes in one line
        raise SystemExit(2)
    if result.returncode:
        raise RuntimeError(f"data-parallel training failed (exit code {result.returncode}); "
                           "see the messages above")


@dataclass
class _Child:
    """A running fold-parallel child and the thread copying its output."""

    proc: subprocess.Popen
    fold: int | str
    log: Path
    output: threading.Thread


def slot_gpus(device: str, n_slots: int, visible: str | None) -> list[str]:
    """The `CUDA_VISIBLE_DEVICES` of each slot's child: its one GPU, the run's GPU `first +
    slot` as this process numbers them (`device` is `cuda` or `cuda:<first>`), named as this
    process's own `visible` list (`CUDA_VISIBLE_DEVICES`; None: every GPU, by index) names
    it, since a child's list is read against the machine's GPUs, not its parent's."""
    first = int(device.partition(":")[2] or 0)
    wanted = range(first, first + n_slots)
    if visible is None:
        return [str(index) for index in wanted]
    listed = [entry.strip() for entry in visible.split(",")]
    if wanted[-1] >= len(listed):
        raise UserInputError(f"device={device} with gpus={n_slots} needs GPUs {first} to "
                             f"{wanted[-1]}, but CUDA_VISIBLE_DEVICES={visible!r} lists "
                             f"{len(listed)}")
    return [listed[index] for index in wanted]


def _start_child(argv: Sequence[str], fold: int | str, slot: int, log_dir: Path,
                 gpu: str | None) -> _Child:
    """Start fold `fold` in slot `slot`; `gpu`: its one visible GPU (None: on the CPU)."""
    env = _child_env(**{CHILD_ENV: "1"})
    if gpu is not None:
        # The child sees one GPU, its cuda:0, whatever GPU the parent was told to start from.
        env["CUDA_VISIBLE_DEVICES"] = gpu
        argv = [*argv, "device=cuda"]
    # The children's bars go where the parent's would: shown (as occasional lines) when the
    # parent's output is a terminal or bars are asked for, else left out of the logs too.
    env[PROGRESS_ENV] = "1" if progress_shown(sys.stdout) else "0"
    log = log_dir / f"fold{fold}.out"
    cmd = [sys.executable, "-m", TRAIN_MODULE, *argv, f"fold={fold}", "gpus=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    where = "" if gpu is None else f", CUDA_VISIBLE_DEVICES={gpu}"
    # Said before its output is relayed: a fold's first line is always its start.
    say(f"fold {fold}: started on slot {slot}{where} (log {log})")
    output = start_pump(proc.stdout, log, f"[fold {fold}] ")
    return _Child(proc, fold, log, output)


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else f"no output (log {log})"


def launch_fold_parallel(argv: Sequence[str], folds: Sequence[int | str], n_slots: int,
                         log_dir: Path, device: str) -> None:
    """One single-process `jaguar_reid.train` per fold, at most `n_slots` at a time, each in a
    free slot. On CUDA (`device`, resolved: `cuda` or `cuda:<first>`) slot s is the run's GPU
    first + s (`slot_gpus`). Each child's
    output goes to `log_dir/fold<k>.out` and, line by line prefixed `[fold k] `, to this
    process's stdout (`child_output`). A child's mistake of the user's (exit status 2, said
    in one line) is said again at the end, in one line."""
    gpus: list[str | None] = [None] * n_slots
    if device.startswith("cuda"):
        gpus = [*slot_gpus(device, n_slots, os.environ.get("CUDA_VISIBLE_DEVICES"))]
    log_dir.mkdir(parents=True, exist_ok=True)
    queue = list(folds)
    running: dict[int, _Child] = {}
    failed: list[_Child] = []
    while queue or running:
        free = [slot for slot in range(n_slots) if slot not in running]
        while queue and free:
            slot = free.pop(0)
            running[slot] = _start_child(argv, queue.pop(0), slot, log_dir, gpus[slot])
        for slot, child in list(running.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del running[slot]
            # Its last lines are shown before its verdict (a DataLoader worker that outlives
            # it could hold the pipe open: not for long).
            child.output.join(timeout=_OUTPUT_GRACE_S)
            if code:
                failed.append(child)
                say(f"fold {child.fold}: FAILED (exit code {code}, log {child.log})")
            else:
                say(f"fold {child.fold}: finished")
        time.sleep(0.2)
    if failed and all(c.proc.returncode == 2 for c in failed):
        raise UserInputError("; ".join(f"fold {c.fold}: {_last_line(c.log)}" for c in failed))
    if failed:
        raise RuntimeError("fold-parallel training failed: " + "; ".join(
            f"fold {c.fold} (exit code {c.proc.returncode}, log {c.log})" for c in failed))
