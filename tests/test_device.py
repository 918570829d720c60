"""Device resolution on GPUs this CPU machine does not have: torch.cuda's answers patched to
those of a Kaggle P100 (refused: today's builds carry no sm_60 kernels), a T4, an H100 reached
only through PTX, a GPU newer than the build, and two GPUs of which one does not fit."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from jaguar_reid.cuda_kernels import fits, parse_arch
from jaguar_reid.io_utils import UserInputError, resolve_device
from tests.helpers import REPO

# torch 2.10 + CUDA 12.8 as Kaggle ships it: no sm_60, no PTX.
KAGGLE_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def fake_cuda(monkeypatch, gpus: list[tuple[str, tuple[int, int]]], archs: list[str],
              version: str = "2.10.0+cu128") -> None:
    """torch.cuda as a machine with `gpus` [(name, capability)] and a build of `archs`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: gpus[i][1])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i=0: SimpleNamespace(name=gpus[i][0]))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch, "__version__", version)


P100 = ("Tesla P100-PCIE-16GB", (6, 0))
T4 = ("Tesla T4", (7, 5))


def test_p100_refused_in_one_line(monkeypatch):
    fake_cuda(monkeypatch, [P100], KAGGLE_ARCHS)
    for name in ("auto", "cuda", "cuda:0"):
        with pytest.raises(UserInputError) as err:
            resolve_device(name)
        assert str(err.value) == (
            "this torch build (2.10.0+cu128) has no kernels for Tesla P100-PCIE-16GB (GPU 0, "
            "sm_60; it has sm_75 sm_80 sm_86 sm_90 sm_100 sm_120); choose a GPU it supports "
            "(on Kaggle: GPU T4 x2 in the notebook's settings), or device=cpu")
    assert resolve_device("cpu") == "cpu"  # the way out the message offers


def test_t4_accepted(monkeypatch):
    fake_cuda(monkeypatch, [T4, T4], KAGGLE_ARCHS)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda", gpus=2) == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"


def test_h100_through_ptx_only(monkeypatch):
    """No sm_90 cubin, but compute_90 PTX: the driver compiles it for the GPU."""
    fake_cuda(monkeypatch, [("NVIDIA H100 80GB HBM3", (9, 0))], ["sm_75", "sm_80", "compute_90"])
    assert resolve_device("cuda") == "cuda"


def test_newer_gpu_than_the_build(monkeypatch):
    """A GPU newer than every cubin runs the build's PTX of a lower capability; without PTX,
    the cubins of an older major version do not run on it."""
    future = ("Future GPU", (13, 0))
    fake_cuda(monkeypatch, [future], ["sm_80", "sm_90", "compute_90"])
    assert resolve_device("auto") == "cuda"
    fake_cuda(monkeypatch, [future], ["sm_80", "sm_90", "sm_120"])
    with pytest.raises(UserInputError, match=r"no kernels for Future GPU \(GPU 0, sm_130;"):
        resolve_device("auto")


def test_every_gpu_of_the_run_is_checked(monkeypatch):
    """gpus=2 uses GPUs 0 and 1: a second GPU the build cannot drive is refused, and a run
    asking for more GPUs than there are is told so."""
    fake_cuda(monkeypatch, [T4, P100], KAGGLE_ARCHS)
    assert resolve_device("cuda") == "cuda"
    with pytest.raises(UserInputError, match=r"no kernels for Tesla P100-PCIE-16GB \(GPU 1,"):
        resolve_device("cuda", gpus=2)
    with pytest.raises(UserInputError, match=r"no kernels for Tesla P100"):
        resolve_device("cuda:1")
    fake_cuda(monkeypatch, [T4], KAGGLE_ARCHS)
    with pytest.raises(UserInputError) as err:
        resolve_device("auto", gpus=2)
    assert str(err.value) == ("device=auto with gpus=2 asks for GPUs 0 to 1, but torch sees 1 "
                              "CUDA device(s) (GPU 0); set gpus= to at most 1")


@pytest.mark.parametrize(("name", "gpus", "n", "advice"), [
    ("cuda:1", 1, 1, "device=cuda:1 asks for GPU 1, but torch sees 1 CUDA device(s) (GPU 0); "
                     "use device=cuda"),
    ("cuda:1", 2, 2, "device=cuda:1 with gpus=2 asks for GPUs 1 to 2, but torch sees 2 CUDA "
                     "device(s) (GPU 0 to 1); use device=cuda"),
    ("cuda:3", 1, 2, "device=cuda:3 asks for GPU 3, but torch sees 2 CUDA device(s) (GPU 0 to "
                     "1); use device=cuda:1 or lower"),
    ("cuda:1", 3, 2, "device=cuda:1 with gpus=3 asks for GPUs 1 to 3, but torch sees 2 CUDA "
                     "device(s) (GPU 0 to 1); set gpus= to at most 2 and device=cuda"),
])
def test_missing_gpus_advice_that_helps(monkeypatch, name, gpus, n, advice):
    """The way out named is one that works: never "gpus= at most 1" to a run of gpus=1."""
    fake_cuda(monkeypatch, [T4] * n, KAGGLE_ARCHS)
    with pytest.raises(UserInputError) as err:
        resolve_device(name, gpus=gpus)
    assert str(err.value) == advice


BAD_DEVICES = ["CUDA", "gpu", "", "mps", "xla", "cuda:00", "cuda:01", "cudax", "cuda0",
               "Cuda:0", " cuda", "cuda ", "cuda:", "cuda:\u00b2", "cuda:\u0660", "cuda:x",
               "cuda:0 ", "cuda:-1", "cuda:+1", "cuda:0:1", "cpu:0", "auto "]


@pytest.mark.parametrize("cuda", [False, True])
def test_device_names_checked_on_any_machine(monkeypatch, cuda):
    """What torch would refuse later (after the image cache) is one line here, on a machine
    with or without a GPU; what it accepts passes."""
    fake_cuda(monkeypatch, [T4, T4] if cuda else [], KAGGLE_ARCHS)
    for name in BAD_DEVICES:
        with pytest.raises(UserInputError) as err:
            resolve_device(name)
        assert str(err.value) == (f"device={name!r}: expected auto, cpu, cuda or cuda:<GPU "
                                  "number> (cuda:0, cuda:1, ...)")
    assert resolve_device("cpu") == "cpu"
    if cuda:
        assert [resolve_device(n) for n in ("auto", "cuda", "cuda:0", "cuda:1")] == [
            "cuda", "cuda", "cuda:0", "cuda:1"]
        for name in ("cuda", "cuda:0", "cuda:1"):
            torch.device(name)  # each accepted name is one torch takes


def test_no_gpu_and_bad_names(monkeypatch):
    fake_cuda(monkeypatch, [], KAGGLE_ARCHS)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(UserInputError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    fake_cuda(monkeypatch, [T4], KAGGLE_ARCHS)
    with pytest.raises(UserInputError, match=r"expected auto, cpu, cuda or cuda:<GPU number>"):
        resolve_device("cuda:first")


@pytest.mark.parametrize(("gpu", "archs", "expected"), [
    ((7, 5), ["sm_75"], True),
    ((8, 6), ["sm_80"], True),          # a cubin runs on a higher minor of its major version
    ((8, 0), ["sm_86"], False),         # ... not on a lower one
    ((9, 0), ["sm_80"], False),         # ... nor on another major version
    ((9, 0), ["sm_90a"], True),         # arch-specific: this capability only
    ((10, 0), ["sm_90a", "compute_90a"], False),
    ((12, 0), ["compute_75"], True),    # PTX: any capability at or above its own
    ((7, 0), ["compute_75"], False),
    ((10, 3), ["sm_100f"], True),       # family-specific: the same major version
    ((12, 0), ["sm_100f"], False),
    ((6, 0), [], True),                 # nothing to judge by: torch decides
    ((6, 0), ["gfx90a", "gfx942"], True),  # a ROCm build's list
])
def test_fits(gpu, archs, expected):
    assert fits(gpu, archs) is expected


def test_parse_arch():
    assert parse_arch("sm_120").capability == (12, 0)
    assert parse_arch("sm_75").capability == (7, 5)
    assert parse_arch("compute_90").ptx
    assert parse_arch("gfx90a") is None


def test_refusal_exits_2_in_one_line(tmp_path):
    """Through the command line: a P100 is one line on stderr and exit status 2."""
    script = (
        "import torch, types\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.device_count = lambda: 1\n"
        "torch.cuda.get_arch_list = lambda: ['sm_75', 'sm_80', 'sm_90']\n"
        "torch.cuda.get_device_capability = lambda i=0: (6, 0)\n"
        "torch.cuda.get_device_properties = lambda i=0: types.SimpleNamespace("
        "name='Tesla P100-PCIE-16GB')\n"
        "torch.version.hip = None\n"
        "from jaguar_reid.io_utils import resolve_device, run_main\n"
        "run_main(lambda argv: resolve_device('auto'), [])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(REPO / "src"),
                                             "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this torch build (")
    assert "no kernels for Tesla P100-PCIE-16GB (GPU 0, sm_60; it has sm_75 sm_80 sm_90)" \
        in lines[0]


def test_gpu_check_refuses_a_p100(monkeypatch, capsys):
    """bench/gpu_check.sh stops before its first section, on the same one line."""
    from tests.test_gpu_check import gpu_check

    fake_cuda(monkeypatch, [T4, P100], KAGGLE_ARCHS)
    assert gpu_check().main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_check: this torch build (2.10.0+cu128) has no kernels for "
                          "Tesla P100-PCIE-16GB (GPU 1, sm_60;")
    fake_cuda(monkeypatch, [], KAGGLE_ARCHS)
    assert gpu_check().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
