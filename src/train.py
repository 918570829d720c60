"""Training, one fold at a time: `bash train.sh fold=0..4 [key=value ...]`.

Per fold, `<output_dir>/<exp>/fold<k>/` receives
  model.safetensors      the trained weights (backbone, GeM, neck, ArcFace head)
  val_embeddings.npz     validation embeddings (L2-normalised) with filenames and labels
  metrics.json           validation pair AUC and identity-balanced mAP, classes, timing
  log.csv                one row per epoch (epoch 0 = the untrained model, the floor)
  config.yaml            the resolved config of this fold
`fold=full` trains on every image with no validation (`fold_full/`). After the folds, the
out-of-fold report of the experiment is (re)written.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.cache import prepare_images
from src.config import Config, ConfigError, config_digest, load_config, save_config, to_plain
from src.data import ImageDataset, build_transform, data_files, image_loader, read_train_csv
from src.embed import embed_images
from src.folds import load_or_create_folds
from src.io_utils import (
    amp_dtype,
    atomic_path,
    atomic_write_json,
    read_json,
    resolve_device,
    run_main,
    seed_everything,
)
from src.model import build_model
from src.scoring import score_embeddings, score_experiment

FULL = "full"


def parse_fold_spec(spec: str, n_folds: int) -> list[int | str]:
    """`0`, `0..4`, `0,2`, `full`, `all` -> the folds to run, in order."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_folds))
    folds: list[int | str] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if part == FULL:
                folds.append(FULL)
            elif ".." in part:
                lo, hi = (int(x) for x in part.split(".."))
                if lo > hi:
                    raise ValueError
                folds.extend(range(lo, hi + 1))
            else:
                folds.append(int(part))
        except ValueError:
            raise ConfigError(
                f"key 'fold': expected 0, 0..4, 0,2, full or all; got {spec!r}") from None
    for fold in folds:
        if fold != FULL and not 0 <= int(fold) < n_folds:
            raise ConfigError(f"key 'fold': fold {fold} is out of range for folds.n_folds="
                              f"{n_folds} (valid: 0..{n_folds - 1} or full)")
    return list(dict.fromkeys(folds))


def fold_dir(cfg: Config, fold: int | str) -> Path:
    name = "fold_full" if fold == FULL else f"fold{fold}"
    return Path(cfg.output_dir) / cfg.exp / name


def _training_digest(cfg: Config) -> str:
    """What decides the trained weights; knobs that only change speed or output are left out."""
    plain = to_plain(cfg)
    plain.pop("fold", None)
    plain.pop("device", None)
    plain.pop("embed", None)
    plain.pop("submit", None)
    plain["data"].pop("num_workers", None)
    plain["data"].pop("dir", None)
    plain["train"].pop("overwrite", None)
    return config_digest(Config(plain))


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up from 1/warmup to 1, then cosine decay to 0 at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with the backbone at `train.lr` and the fresh layers (GeM, neck, head) at
    `train.head_lr`; weight decay only on weight matrices and kernels. Decaying norms' scales,
    biases or GeM's exponent pulls them towards 0, which is not a prior anyone wants."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (name.startswith("backbone."), param.ndim > 1)
            groups.setdefault(key, []).append(param)
    param_groups = []
    for (in_backbone, decays), params in sorted(groups.items(), reverse=True):
        param_groups.append({"params": params,
                             "lr": cfg.train.lr if in_backbone else cfg.train.head_lr,
                             "weight_decay": cfg.train.weight_decay if decays else 0.0})
    return torch.optim.AdamW(param_groups)


def _append_log(path: Path, row: dict) -> None:
    # The log grows row by row so a run that dies keeps its history; one short line at a time.
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _validate(model: torch.nn.Module, paths: list[Path], labels: np.ndarray, cfg: Config,
              device: str, load) -> tuple[np.ndarray, dict]:
    emb = embed_images(model, paths, cfg, device, load)
    return emb, score_embeddings(emb, labels)


def train_fold(cfg: Config, fold: int | str, folds_df: pd.DataFrame,
               paths: list[Path], load, train_load) -> dict:
    """Train one fold (or `full`) and write its outputs; returns its metrics. `paths[i]` is
    the file of `folds_df` row i; `load` reads it (cached or source) and `train_load` reads it
    with the training-only augmentations."""
    out = fold_dir(cfg, fold)
    digest = _training_digest(cfg)
    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and not cfg.train.overwrite:
        previous = read_json(metrics_path)
        if previous.get("training_digest") != digest:
            raise ConfigError(
                f"{out} holds a finished fold trained with a different config; use a new exp=NAME "
                "or train.overwrite=true to replace it"
            )
        print(f"fold {fold}: already finished in {out}; skipping (train.overwrite=true retrains)")
        return previous
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.csv"
    if log_path.exists():
        log_path.unlink()

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if fold == FULL:
        is_val = np.zeros(len(folds_df), dtype=bool)
    else:
        is_val = (folds_df["fold"] == fold).to_numpy()
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    classes = sorted(folds_df["ground_truth"].iloc[train_idx].unique())
    class_of = {name: i for i, name in enumerate(classes)}
    train_labels = [class_of[g] for g in folds_df["ground_truth"].iloc[train_idx]]
    val_paths = [paths[i] for i in val_idx]
    val_labels = folds_df["ground_truth"].to_numpy()[val_idx]

    model = build_model(cfg, n_classes=len(classes)).to(device)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_set = ImageDataset([paths[i] for i in train_idx], train_labels,
                             build_transform(cfg, train=True), train_load)
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True,
                        generator=generator, num_workers=cfg.data.num_workers,
                        drop_last=len(train_set) > cfg.train.batch_size,
                        pin_memory=device.startswith("cuda"),
                        persistent_workers=cfg.data.num_workers > 0)
    steps_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup_steps))
    dtype = amp_dtype(device, cfg.train.amp)
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    print(f"fold {fold}: {len(train_idx)} train images of {len(classes)} identities, "
          f"{len(val_idx)} validation images; {cfg.model.backbone} on {device}")
    started = time.time()
    history: list[dict] = []
    if len(val_idx):
        _, scores = _validate(model, val_paths, val_labels, cfg, device, load)
        row = {"epoch": 0, "loss": float("nan"), "lr": 0.0, **scores, "images_per_s": 0.0}
        _append_log(log_path, row)
        history.append(row)
        print(f"fold {fold} epoch 0 (untrained): pair AUC {scores['pair_auc']:.4f}  "
              f"mAP {scores['map']:.4f}")

    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        epoch_start, seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(loader, desc=f"fold {fold} epoch {epoch}/{cfg.train.epochs}", leave=False,
                   mininterval=1.0, dynamic_ncols=True, disable=None)
        optimizer.zero_grad(set_to_none=True)
        for i, (images, labels, _) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                logits = model.head(model(images), labels)
            loss = F.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fold {fold} epoch {epoch}: loss is {loss.item()}; "
                                         "lower train.lr or turn off train.amp")
            scaled = loss / cfg.train.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            if (i + 1) % cfg.train.grad_accum == 0 or i + 1 == len(loader):
                if scaler:
                    scaler.unscale_(optimizer)  # clip the true gradients, not scaled ones
                if cfg.train.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            seen += len(images)
            loss_sum += loss.item() * len(images)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}",
                            img_s=f"{seen / (time.time() - epoch_start):.1f}")
        bar.close()
        row = {"epoch": epoch, "loss": loss_sum / max(seen, 1),
               "lr": optimizer.param_groups[0]["lr"], "pair_auc": float("nan"),
               "map": float("nan"), "images_per_s": seen / (time.time() - epoch_start)}
        if len(val_idx):
            _, scores = _validate(model, val_paths, val_labels, cfg, device, load)
            row.update(scores)
        _append_log(log_path, row)
        history.append(row)
        print(f"fold {fold} epoch {epoch}: loss {row['loss']:.3f}  pair AUC {row['pair_auc']:.4f}"
              f"  mAP {row['map']:.4f}  {row['images_per_s']:.1f} img/s")

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    metrics: dict = {"fold": fold, "n_train": len(train_idx), "n_val": len(val_idx),
                     "classes": classes, "training_digest": digest,
                     "seconds": round(time.time() - started, 1), "device": device}
    if len(val_idx):
        emb, scores = _validate(model, val_paths, val_labels, cfg, device, load)
        metrics.update(scores)
        metrics["untrained"] = {k: history[0][k] for k in ("pair_auc", "map")}
        with atomic_path(out / "val_embeddings.npz", suffix=".npz") as tmp:
            np.savez(tmp, embeddings=emb,
                     filenames=folds_df["filename"].to_numpy()[val_idx].astype(str),
                     labels=val_labels.astype(str))
    save_config(Config({**cfg, "fold": str(fold)}), out / "config.yaml")
    # Written last: its presence is what marks the fold as finished.
    atomic_write_json(metrics_path, metrics)
    return metrics


def run(cfg: Config) -> dict:
    """Train the folds `cfg.fold` asks for, then rewrite the experiment's out-of-fold report."""
    folds_to_run = parse_fold_spec(cfg.fold, cfg.folds.n_folds)
    files = data_files(cfg)
    train_df = read_train_csv(files["train"])
    paths, load, records = prepare_images(cfg, train_df["filename"], files["train"], "train images")
    hashes = None if records is None else [r["phash"] for r in records]
    train_load = image_loader(cfg, cached=records is not None, train=True)
    folds_df = load_or_create_folds(cfg, train_df, hashes)
    exp_dir = Path(cfg.output_dir) / cfg.exp
    exp_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, exp_dir / "config.yaml")
    results = {}
    for fold in folds_to_run:
        results[fold] = train_fold(cfg, fold, folds_df, paths, load, train_load)
    if any(fold != FULL for fold in folds_to_run):
        score_experiment(exp_dir)
    return results


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    run(cfg)


if __name__ == "__main__":
    run_main(main)
