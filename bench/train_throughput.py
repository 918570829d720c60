"""Training throughput of a config on synthetic data: images/s, model FLOPs utilisation, memory.

    python bench/train_throughput.py [config=...] [key=value ...] [--steps 5] [--warmup 1]
    python bench/train_throughput.py config=configs/demo.yaml          # the tiny CPU config
    python bench/train_throughput.py model.grad_checkpointing=false    # the EVA-02 L recipe

Each micro-batch goes through the training loop's own step (`jaguar_reid.training.loop`: the
`StepModule` forward, autocast in `train.amp_dtype`, the loss and its fp16 loss scaler, the
backward), and every `train.grad_accum` micro-batches through its optimiser step (unscale,
clip, AdamW). FLOPs are counted for one image (forward and backward, every matmul, convolution
and attention, torch's FlopCounterMode, without gradient checkpointing's recomputation) and set
against the GPU's dense peak for the autocast dtype. No dataset is needed: batches are random
tensors of the configured size, so the figure is the model's, not the data pipeline's
(bench/cache_speed.py measures that). bench/gpu_check.py builds on these functions.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from jaguar_reid.config import Config, load_config  # noqa: E402
from jaguar_reid.io_utils import amp_dtype, resolve_device  # noqa: E402
from jaguar_reid.training.loop import (  # noqa: E402
    Parts,
    Run,
    Split,
    StepModule,
    backward_step,
)
from jaguar_reid.training.losses import Criterion  # noqa: E402
from jaguar_reid.training.model import ReIDModel, build_model  # noqa: E402
from jaguar_reid.training.optim import build_optimizer, optimizer_step  # noqa: E402

# Dense (no sparsity) tensor-core peaks, TFLOP/s, from the vendors' data sheets: (a fragment of
# torch.cuda.get_device_name, bf16, fp16), the most specific fragment first ("H100 PCIe"
# before "H100", "A100" before "A10", "L40S" before "L4"). None: no native bf16 (T4, P100
# emulate it).
PEAK_TFLOPS: tuple[tuple[str, float | None, float | None], ...] = (
    ("H100 PCIe", 756.0, 756.0),
    ("H100 NVL", 835.0, 835.0),
    ("H100", 989.0, 989.0),  # SXM
    ("H200", 989.0, 989.0),
    ("A100", 312.0, 312.0),
    ("A10", 125.0, 125.0),
    ("L40S", 362.0, 362.0),
    ("L4", 121.0, 121.0),
    ("T4", None, 65.0),
    ("P100", None, 18.7),
)
COMPETITION_TRAIN_IMAGES = 1895  # train.csv; 4/5 of it trains in each of 5 folds
JAGUAR_IDENTITIES = 31  # ArcFace classes of the competition's training set


def peak_for_name(name: str, dtype: torch.dtype | None) -> float | None:
    """The dense peak (TFLOP/s) of a GPU by its name for an autocast dtype; None when unknown
    or for fp32 (no autocast)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for fragment, bf16, fp16 in PEAK_TFLOPS:
        if fragment in name:
            return bf16 if dtype == torch.bfloat16 else fp16
    return None


def peak_tflops(device: str, dtype: torch.dtype | None = torch.bfloat16) -> float | None:
    if not device.startswith("cuda"):
        return None
    return peak_for_name(torch.cuda.get_device_name(device), dtype)


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def sync(device: str) -> None:
    """Wait for the GPU: CUDA calls return before the work is done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: str) -> int:
    """The GPU's allocated high-water mark since the last reset; on the CPU the process's peak
    resident memory (never reset, so the largest of everything run so far)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class TrainBench:
    """The model and optimiser training builds, for synthetic batches; built once and reused
    across variants of the config (dtype, checkpointing, batch size, compile) that do not
    change the model's shape."""

    cfg: Config
    device: str
    model: ReIDModel
    optimizer: torch.optim.Optimizer
    n_classes: int


def build_bench(cfg: Config, device: str, n_classes: int = JAGUAR_IDENTITIES) -> TrainBench:
    model = build_model(cfg, n_classes).to(device)
    return TrainBench(cfg, device, model, build_optimizer(model, cfg), n_classes)


def make_step(bench: TrainBench, cfg: Config,
              compile_backend: str | None = None) -> tuple[Callable[[], None], torch.dtype | None]:
    """One micro-batch of `cfg` (batch size, autocast dtype, checkpointing, compile) through
    the training loop's own step; the optimiser steps every `train.grad_accum` calls. Returns
    the step and its autocast dtype (None: fp32). `compile_backend` compiles with that
    torch.compile backend instead of the loop's default (the CPU smoke test's "eager")."""
    model, device = bench.model, bench.device
    if hasattr(model.backbone, "set_grad_checkpointing"):
        model.backbone.set_grad_checkpointing(bool(cfg.model.grad_checkpointing))
    dtype = amp_dtype(device, cfg.train.amp, cfg.train.amp_dtype)
    # As build_parts: fp16 needs loss scaling against underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    loop_cfg = cfg
    if compile_backend:
        loop_cfg = Config({**cfg, "train": Config({**cfg.train, "compile": False})})
    # Run and Parts carry only what the step reads; the data fields stay empty (an empty
    # split: no images, no teacher targets, so the ArcFace step).
    no_images = Split([], [], [], [], [], np.zeros(0), np.zeros(0))
    run = Run(loop_cfg, "bench", Path("."), "", no_images, None, device)
    parts = Parts(model, bench.optimizer, None, None, scaler, None, None, dtype,
                  Criterion(loop_cfg, loop_cfg.model.embed_dim).to(device))
    module = StepModule(run, parts).for_epoch(1)
    if compile_backend:
        module = torch.compile(module, backend=compile_backend)
    size, batch = cfg.data.img_size, cfg.train.batch_size
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, bench.n_classes, (batch,), device=device)
    if cfg.train.sampler == "pk":  # as the P x K sampler groups them: K images of P identities
        k = cfg.train.pk_k
        labels = (torch.arange(batch // k, device=device) % bench.n_classes).repeat_interleave(k)
    calls = itertools.count(1)

    def step() -> None:
        backward_step(run, parts, module, images, labels, 1)
        if next(calls) % cfg.train.grad_accum == 0:
            optimizer_step(model, bench.optimizer, scaler, cfg.train.clip_grad)

    return step, dtype


@dataclass
class Timing:
    images_per_s: float
    seconds: float  # the timed micro-batches
    peak_bytes: int
    warmup_s: float  # the untimed micro-batches first (compilation, allocator, cuDNN choices)


def time_step(step: Callable[[], None], device: str, batch: int, micro_batches: int,
              warmup: int) -> Timing:
    """`warmup` untimed micro-batches, then `micro_batches` timed ones; peak memory over the
    timed ones (on a GPU)."""
    warmup_s = _run(step, warmup, device)
    reset_peak_memory(device)
    seconds = _run(step, micro_batches, device)
    return Timing(micro_batches * batch / seconds, seconds, peak_memory_bytes(device), warmup_s)


def _run(step: Callable[[], None], times: int, device: str) -> float:
    """Seconds for `times` calls of `step`, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    for _ in range(times):
        step()
    sync(device)
    return time.perf_counter() - start


def flops_per_image(model: ReIDModel, cfg: Config, device: str,
                    n_classes: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one image, without gradient checkpointing's
    recomputed forward: MFU counts the model's work, not the extra work a memory trade-off
    adds."""
    checkpointing = hasattr(model.backbone, "set_grad_checkpointing")
    if checkpointing:
        model.backbone.set_grad_checkpointing(False)
    x = torch.randn(1, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    y = torch.randint(0, n_classes, (1,), device=device)
    model.eval()  # BatchNorm cannot train on one image; the FLOPs are the same
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model.head(model(x), y).float(), y)
        forward = float(counter.get_total_flops())
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.train()
    if checkpointing:
        model.backbone.set_grad_checkpointing(bool(cfg.model.grad_checkpointing))
    return forward, float(counter.get_total_flops())


def model_flops_per_image(model: ReIDModel, cfg: Config, device: str, n_classes: int) -> float:
    """Forward + backward FLOPs of one image (see `flops_per_image`)."""
    return flops_per_image(model, cfg, device, n_classes)[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimiser steps first")
    parser.add_argument("--classes", type=int, default=JAGUAR_IDENTITIES,
                        help="ArcFace classes (31 jaguars)")
    args, overrides = parser.parse_known_args()
    cfg = load_config(overrides)
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    bench = build_bench(cfg, device, args.classes)
    flops = flops_per_image(bench.model, cfg, device, args.classes)[1]
    step, dtype = make_step(bench, cfg)
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    timing = time_step(step, device, batch, args.steps * accum, args.warmup * accum)

    achieved = flops * timing.images_per_s / 1e12
    peak = peak_tflops(device, dtype)
    if device.startswith("cuda"):
        memory = f"{timing.peak_bytes / 2**30:.1f} GiB GPU peak"
        where = torch.cuda.get_device_name(device)
    else:
        memory = f"{timing.peak_bytes / 2**30:.1f} GiB RSS peak"
        where = f"CPU, {torch.get_num_threads()} threads"
    per_fold_images = cfg.train.epochs * COMPETITION_TRAIN_IMAGES * 4 / 5
    five_folds_min = 5 * per_fold_images / timing.images_per_s / 60
    print(f"{cfg.model.backbone} @ {cfg.data.img_size}px, batch {batch} x {accum}, "
          f"autocast {dtype_name(dtype)}, grad_checkpointing={cfg.model.grad_checkpointing}, "
          f"compile={cfg.train.compile} on {where}")
    print(f"  {timing.images_per_s:.3g} images/s; {flops / 1e9:.1f} GFLOP per image (forward "
          f"+ backward); {achieved:.2f} TFLOP/s achieved; warm-up {timing.warmup_s:.1f} s")
    print(f"  MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s dense {dtype_name(dtype)}" if peak
          else "  MFU: no known peak for this device and dtype")
    print(f"  memory: {memory}")
    print(f"  5 folds x {cfg.train.epochs} epochs of the competition's train images "
          f"(~{COMPETITION_TRAIN_IMAGES * 4 // 5} per fold): {five_folds_min:.0f} min of "
          "training steps (validation and data loading not included)")


if __name__ == "__main__":
    main()
