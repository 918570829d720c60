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

from jaguar_reid.io_utils import UserInputError

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


def check_gpus(indices: list[int]) -> None:
    """Stop in one line when a GPU of `indices` is missing, or when this torch build has no
    kernel for it."""
    import torch

    visible = torch.cuda.device_count()
    if indices and max(indices) >= visible:
        raise UserInputError(
            f"{len(indices)} GPU(s) asked for (GPU {min(indices)} to {max(indices)}), but "
            f"torch sees {visible} CUDA device(s); set gpus= to at most {visible} (or choose a "
            "machine with more GPUs)")
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
