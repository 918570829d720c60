"""What each training loss and the attention add to a training step, side by side in one run.

    python bench/loss_cost.py config=configs/dogface_lite0.yaml [key=value ...] [--steps 4]

Every variant goes through the training loop's own step (bench/train_throughput.py's
`make_step`: StepModule forward, the loop's `Criterion`, backward, AdamW every
`train.grad_accum` micro-batches) on synthetic batches labelled as the P x K sampler groups
them, after the same warm-up; the variants run in turns (round robin, `--rounds`), so a machine
that slows down during the run slows them all alike. Printed: images/s and the step time of
each variant as a ratio to ArcFace alone with the P x K sampler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from train_throughput import build_bench, make_step, time_step  # noqa: E402

from jaguar_reid.config import load_config  # noqa: E402
from jaguar_reid.io_utils import resolve_device  # noqa: E402

PK = ["train.sampler=pk", "train.pk_k=4"]
VARIANTS: dict[str, list[str]] = {
    "arcface (pk)": PK,
    "+ contrastive": [*PK, "loss.contrastive=1"],
    "+ multi_similarity": [*PK, "loss.multi_similarity=1"],
    "+ multi_similarity, xbm 1024": [*PK, "loss.multi_similarity=1", "loss.xbm_size=1024"],
    "+ multi_similarity, metrix": [*PK, "loss.multi_similarity=1", "train.metrix_alpha=2"],
    "+ smooth_ap": [*PK, "loss.smooth_ap=1"],
    "+ recall_k": [*PK, "loss.recall_k=1"],
    "+ recall_k, simix": [*PK, "loss.recall_k=1", "train.metrix_alpha=1"],
    "attention glam": [*PK, "model.attention=glam"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="timed micro-batches per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    args, overrides = parser.parse_known_args()
    steps = {}
    for name, extra in VARIANTS.items():
        cfg = load_config([*overrides, *extra])
        device = resolve_device(cfg.device)
        torch.manual_seed(0)
        steps[name] = (make_step(build_bench(cfg, device), cfg)[0], device, cfg)
    seconds = dict.fromkeys(steps, 0.0)
    images = dict.fromkeys(steps, 0)
    for step, device, cfg in steps.values():
        time_step(step, device, cfg.train.batch_size, 0, args.warmup)
    for _ in range(args.rounds):
        for name, (step, device, cfg) in steps.items():
            timing = time_step(step, device, cfg.train.batch_size, args.steps, 0)
            seconds[name] += timing.seconds
            images[name] += args.steps * cfg.train.batch_size
    base = seconds["arcface (pk)"] / images["arcface (pk)"]
    cfg = next(iter(steps.values()))[2]
    print(f"{cfg.model.backbone} @ {cfg.data.img_size}px, batch {cfg.train.batch_size} "
          f"(P x K = {cfg.train.batch_size // cfg.train.pk_k} x {cfg.train.pk_k}), "
          f"{args.rounds} rounds x {args.steps} micro-batches, {torch.get_num_threads()} threads")
    print("| variant | images/s | step time vs arcface (pk) |\n|---|---|---|")
    for name in steps:
        per_image = seconds[name] / images[name]
        print(f"| {name} | {1 / per_image:.2f} | {per_image / base:.2f}x |")


if __name__ == "__main__":
    main()
