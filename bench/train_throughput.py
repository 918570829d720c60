"""Training throughput of a config on synthetic data: images/s, model FLOPs utilisation, memory.

    python bench/train_throughput.py [config=...] [key=value ...] [--steps 20] [--warmup 3]
    python bench/train_throughput.py config=configs/demo.yaml          # the tiny CPU config
    python bench/train_throughput.py model.grad_checkpointing=false    # the EVA-02 L recipe

FLOPs are counted for one optimiser step of the model (forward and backward, every matmul and
convolution, torch's FlopCounterMode) and set against the GPU's dense bf16 peak. No dataset is
needed: batches are random tensors of the configured size, so the figure is the model's, not
the data pipeline's (bench/cache_speed.py measures that).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from jaguar_reid.config import load_config  # noqa: E402
from jaguar_reid.io_utils import amp_dtype, resolve_device  # noqa: E402
from jaguar_reid.training.model import TrainStep, build_model  # noqa: E402
from jaguar_reid.training.optim import build_optimizer  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
COMPETITION_TRAIN_IMAGES = 1895  # train.csv; 4/5 of it trains in each of 5 folds


def peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def step_fn(model, optimizer, cfg, device, n_classes):
    dtype = amp_dtype(device, cfg.train.amp, cfg.train.amp_dtype)
    # The training module exactly as jaguar_reid.training.loop runs it, compiled when
    # train.compile asks.
    forward = TrainStep(model)
    if cfg.train.compile:
        forward = torch.compile(forward)
    x = torch.randn(cfg.train.batch_size, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    y = torch.randint(0, n_classes, (cfg.train.batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            logits = forward(x, y)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def model_flops_per_image(model, cfg, device: str, n_classes: int) -> float:
    """Forward + backward FLOPs of one image, without gradient checkpointing's recomputed
    forward: MFU counts the model's work, not the extra work a memory trade-off adds."""
    checkpointing = cfg.model.grad_checkpointing and hasattr(model.backbone,
                                                              "set_grad_checkpointing")
    if checkpointing:
        model.backbone.set_grad_checkpointing(False)
    x = torch.randn(1, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    y = torch.randint(0, n_classes, (1,), device=device)
    model.eval()  # BatchNorm cannot train on one image; the FLOPs are the same
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.head(model(x), y).float(), y).backward()
    model.zero_grad(set_to_none=True)
    model.train()
    if checkpointing:
        model.backbone.set_grad_checkpointing(True)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--classes", type=int, default=31, help="ArcFace classes (31 jaguars)")
    args, overrides = parser.parse_known_args()
    cfg = load_config(overrides)
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = build_model(cfg, args.classes).to(device).train()
    optimizer = build_optimizer(model, cfg)
    step = step_fn(model, optimizer, cfg, device, args.classes)

    flops_per_step = model_flops_per_image(model, cfg, device, args.classes) * \
        cfg.train.batch_size
    for _ in range(args.warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    images_per_s = args.steps * cfg.train.batch_size / seconds
    achieved = flops_per_step * args.steps / seconds / 1e12
    peak = peak_tflops(device)
    if device.startswith("cuda"):
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB GPU peak"
        where = torch.cuda.get_device_name(device)
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS peak"
        where = f"CPU, {torch.get_num_threads()} threads"
    per_fold_images = cfg.train.epochs * COMPETITION_TRAIN_IMAGES * 4 / 5
    five_folds_min = 5 * per_fold_images / images_per_s / 60
    print(f"{cfg.model.backbone} @ {cfg.data.img_size}px, batch {cfg.train.batch_size}, "
          f"amp={cfg.train.amp}, grad_checkpointing={cfg.model.grad_checkpointing}, "
          f"compile={cfg.train.compile} on {where}")
    print(f"  {images_per_s:.3g} images/s; {flops_per_step / cfg.train.batch_size / 1e9:.1f} "
          f"GFLOP per image (forward + backward); {achieved:.2f} TFLOP/s achieved")
    print(f"  MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s dense bf16" if peak else
          "  MFU: no known peak for this device")
    print(f"  memory: {memory}")
    print(f"  5 folds x {cfg.train.epochs} epochs of the competition's train images "
          f"(~{COMPETITION_TRAIN_IMAGES * 4 // 5} per fold): {five_folds_min:.0f} min of "
          "training steps (validation and data loading not included)")


if __name__ == "__main__":
    main()
