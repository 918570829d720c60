"""Does this torch build carry kernels for this GPU? Checked when the device is chosen, so
that a GPU the build cannot drive (a Kaggle P100, compute capability 6.0, under a torch built
for 7.5 and newer) stops in one line, instead of `torch.cuda.is_available()` saying yes and the
first CUDA operation failing with "no kernel image is available".

`torch.cuda.get_arch_list()` names what the build compiled: `sm_XY` machine code (cubins) and
`compute_XY` PTX. A cubin runs on GPUs of its major version and the same or a higher minor one
(sm_80 on 8.6, not on 9.0); an arch-specific one (`sm_90a`) only on exactly that capability.
PTX is compiled by the driver at load time for any GPU of the same or a higher capability
(compute_90 runs on 9.0, 10.0, 12.0), which is how a build reaches GPUs newer than itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jaguar_reid.errors import UserInputError

_ARCH = re.compile(r"^(sm|compute)_(\d+)([af]?)$")
Capability = tuple[int, int]  # (major, minor), as torch.cuda.get_device_capability gives


@dataclass(frozen=True)
class Arch:
    """One entry of `torch.cuda.get_arch_list()`."""

    ptx: bool  # compute_XY: PTX, compiled for the GPU by the driver
    capability: Capability
    suffix: str  # "a": this capability only; "f": this family (same major)

    def runs_on(self, gpu: Capability) -> bool:
        if self.suffix == "a":
            return gpu == self.capability
        if self.suffix == "f" or not self.ptx:
            return gpu[0] == self.capability[0] and gpu[1] >= self.capability[1]
        return gpu >= self.capability


def parse_arch(entry: str) -> Arch | None:
    """`sm_75`, `sm_120`, `sm_90a`, `compute_90` -> Arch; None for what is not CUDA (ROCm's
    `gfx90a`)."""
    match = _ARCH.match(entry)
    if match is None:
        return None
    kind, digits, suffix = match.groups()
    number = int(digits)
    return Arch(kind == "compute", (number // 10, number % 10), suffix)


def fits(gpu: Capability, arch_list: list[str]) -> bool:
    """Whether any kernel of the build runs on a GPU of capability `gpu`. An arch list with
    no CUDA entry (empty, or a ROCm build's) is taken as fitting: there is nothing to judge
    by, and torch itself then decides."""
    archs = [a for a in map(parse_arch, arch_list) if a is not None]
    return not archs or any(a.runs_on(tuple(gpu)) for a in archs)


def sm_name(gpu: Capability) -> str:
    return f"sm_{gpu[0]}{gpu[1]}"


def too_few_gpus(device: str, first: int, count: int, visible: int) -> str | None:
    """The one line for `device` (`cuda` or `cuda:<first>`) with gpus=`count`, which uses
    GPUs first .. first + count - 1, on a machine where torch sees `visible`; None when they
    are all there."""
    if first + count <= visible:
        return None
    wanted = f"GPU {first}" if count == 1 else f"GPUs {first} to {first + count - 1}"
    have = f"GPU 0 to {visible - 1}" if visible > 1 else "GPU 0" if visible else "none"
    asked = f"device={device}" + (f" with gpus={count}" if count > 1 else "")
    highest = visible - count  # the highest GPU the run may start from
    if not visible:
        fix = "use device=cpu"
    elif highest < 0:
        fix = f"set gpus= to at most {visible}" + (" and device=cuda" if first else "")
    else:
        fix = f"use device=cuda:{highest} or lower" if highest else "use device=cuda"
    return (f"{asked} asks for {wanted}, but torch sees {visible} CUDA device(s) ({have}); "
            f"{fix}")


def check_gpus(device: str, first: int, count: int) -> None:
    """Stop in one line when a GPU of the run's (`count` from `first`, for `device`) is
    missing, or when this torch build has no kernel for it."""
    import torch

    message = too_few_gpus(device, first, count, torch.cuda.device_count())
    if message is not None:
        raise UserInputError(message)
    indices = list(range(first, first + count))
    if torch.version.hip:  # ROCm: get_arch_list names gfx targets, judged by torch itself
        return
    arch_list = list(torch.cuda.get_arch_list())
    for index in indices:
        gpu = tuple(torch.cuda.get_device_capability(index))
        if fits(gpu, arch_list):
            continue
        name = torch.cuda.get_device_properties(index).name
        raise UserInputError(
            f"this torch build ({torch.__version__}) has no kernels for {name} (GPU {index}, "
            f"{sm_name(gpu)}; it has {' '.join(arch_list)}); choose a GPU it supports (on "
            "Kaggle: GPU T4 x2 in the notebook's settings), or device=cpu")
