"""The machine-dependent defaults a newcomer meets: the autocast dtype on each GPU generation,
the DataLoader's worker count, and the stop before training a backbone from noise."""

from __future__ import annotations

import pytest
import torch

from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.io_utils import amp_dtype, loader_workers

# (GPU, compute capability, autocast dtype `auto` must choose)
GPUS = [("P100", (6, 0), torch.float16), ("V100", (7, 0), torch.float16),
        ("T4", (7, 5), torch.float16), ("A100", (8, 0), torch.bfloat16),
        ("L4", (8, 9), torch.bfloat16), ("H100", (9, 0), torch.bfloat16)]


@pytest.mark.parametrize(("gpu", "capability", "expected"), GPUS)
def test_auto_amp_dtype_is_bf16_only_where_the_gpu_computes_it(monkeypatch, gpu, capability,
                                                              expected):
    # torch says bf16 is "supported" on a T4 or P100 too (emulated): the choice must not ask it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert amp_dtype("cuda", True) is expected, gpu
    assert amp_dtype("cuda:1", True, "auto") is expected, gpu
    # An explicit choice wins on every GPU; amp off or the CPU means full precision.
    assert amp_dtype("cuda", True, "fp16") is torch.float16
    assert amp_dtype("cuda", True, "bf16") is torch.bfloat16
    assert amp_dtype("cuda", False, "bf16") is None
    assert amp_dtype("cpu", True, "fp16") is None


def test_amp_dtype_key_is_checked():
    assert load_config(["train.amp_dtype=fp16"]).train.amp_dtype == "fp16"
    with pytest.raises(ConfigError, match="train.amp_dtype"):
        load_config(["train.amp_dtype=fp8"])
    with pytest.raises(ValueError, match="train.amp_dtype"):
        amp_dtype("cuda", True, "half")


def test_num_workers_auto_is_the_cpu_count_at_most_4(monkeypatch):
    import os

    for cpus, expected in ((1, 1), (2, 2), (4, 4), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert loader_workers("auto") == expected
    assert loader_workers(0) == 0
    assert loader_workers(7) == 7  # an explicit number is taken as given


def test_num_workers_key_takes_auto_or_a_count():
    assert load_config([]).data.num_workers == "auto"
    assert load_config(["data.num_workers=3"]).data.num_workers == 3
    # Only num_workers takes a number for its `auto`: a `device=0` stays text (found by the
    # fuzz test when `auto` keys took numbers across the board).
    assert load_config(["device=0"]).device == "0"
    for bad in ("many", "-1", "2.5"):
        with pytest.raises(ConfigError, match="data.num_workers"):
            load_config([f"data.num_workers={bad}"])


def test_training_without_weights_stops_unless_random_init_is_asked_for(tmp_path):
    from jaguar_reid.train import recipe
    from jaguar_reid.training.model import RandomInitError

    args = ["model.backbone=resnet18", f"output_dir={tmp_path}"]
    with pytest.raises(RandomInitError, match=r"model.weights=PATH.*allow_random_init=true"):
        recipe(load_config(args))
    assert recipe(load_config([*args, "model.allow_random_init=true"])).model.backbone == \
        "resnet18"
    # The recipe's default (EVA-02 L) is named in the stop.
    with pytest.raises(RandomInitError, match="eva02_large_patch14_448"):
        recipe(load_config([f"output_dir={tmp_path}"]))
