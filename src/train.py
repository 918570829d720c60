"""Training, one fold at a time: `bash train.sh fold=0..4 [key=value ...]`.

Per fold, `<output_dir>/<exp>/fold<k>/` receives
  model.safetensors      the kept weights (`train.select`: last or best; EMA when `train.ema`)
  best.safetensors       the best weights by validation `train.monitor` (folds with validation)
  val_embeddings.npz     validation embeddings (L2-normalised): `embeddings` (the chosen
                         `model.retrieval`) and each of neck / backbone / both, with filenames
                         and labels
  metrics.json           validation scores of every retrieval embedding, classes, timing
  log.csv                one row per epoch (epoch 0 = before training: the floor)
  config.yaml            the resolved config of this fold
  checkpoint.pt          while training: everything needed to resume (removed when finished)
  train.lock             while training: held by the one process training the fold (src/lock.py)
`fold=full` trains on every image with no validation (`fold_full/`). After the folds, the
out-of-fold report of the experiment is (re)written.

A run that dies is started again with the same command: each fold resumes from its last
checkpoint (end of an epoch) and, on a CPU, ends bit-identical to a run that never stopped. A
second run of a fold that is training is refused (the fold's lock); the temporary files of a
killed writer are removed when the fold starts again; a full disk is a clear error that keeps
the last checkpoint. docs/bad_inputs.md ("Faults") lists the tests that try each.
"""

from __future__ import annotations

import csv
import os
import pickle
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from src import distributed
from src.augment import build_transform
from src.cache import prepare_images
from src.config import Config, ConfigError, config_digest, load_config, save_config, to_plain
from src.data import ImageDataset, data_files, image_loader, read_train_csv
from src.embed import embed_all
from src.folds import load_or_create_folds
from src.io_utils import (
    amp_dtype,
    atomic_path,
    atomic_write_json,
    explain_disk_full,
    read_json,
    remove_stray_temps,
    resolve_device,
    run_main,
    seed_everything,
)
from src.lock import fold_lock
from src.model import RETRIEVAL_MODES, ReIDModel, TrainStep, build_model
from src.optim import (
    ModelEma,
    build_optimizer,
    cosine_with_warmup,
    lr_lambdas,
    optimizer_step,
)
from src.report import after_run
from src.sampler import TrainBatchSampler
from src.scoring import score_embeddings, score_experiment

__all__ = ["cosine_with_warmup", "fold_dir", "parse_fold_spec", "run", "train_fold"]

FULL = "full"
# Every file train_fold writes into the fold's folder: the temporary copies of these that a
# killed run left behind are removed when the fold starts again.
FOLD_FILES = ("model.safetensors", "best.safetensors", "val_embeddings.npz", "metrics.json",
              "log.csv", "config.yaml", "checkpoint.pt")
LOG_FIELDS = ["epoch", "loss", "lr", "pair_auc", "map",
              *[f"{m}_{k}" for k in RETRIEVAL_MODES for m in ("pair_auc", "map")],
              "images_per_s", "seconds"]


def parse_fold_spec(spec: str, n_folds: int, key: str = "fold") -> list[int | str]:
    """`0`, `0..4`, `0,2`, `full`, `all` -> the folds to run, in order; errors name `key`."""
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
                f"key '{key}': expected 0, 0..4, 0,2, full or all; got {spec!r}") from None
    for fold in folds:
        if fold != FULL and not 0 <= int(fold) < n_folds:
            raise ConfigError(f"key '{key}': fold {fold} is out of range for folds.n_folds="
                              f"{n_folds} (valid: 0..{n_folds - 1} or full)")
    return list(dict.fromkeys(folds))


def fold_dir(cfg: Config, fold: int | str) -> Path:
    name = "fold_full" if fold == FULL else f"fold{fold}"
    return Path(cfg.output_dir) / cfg.exp / name


def _training_digest(cfg: Config) -> str:
    """What decides the trained weights; knobs that only change speed or output are left out."""
    plain = to_plain(cfg)
    for key in ("fold", "device", "embed", "submit", "parallel", "post", "tune", "report",
                "exps"):
        plain.pop(key, None)
    plain["data"].pop("num_workers", None)
    plain["data"].pop("dir", None)
    plain["train"].pop("overwrite", None)
    plain["train"].pop("compile", None)
    return config_digest(Config(plain))


# --------------------------------------------------------------------------- checkpoints

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


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))


def _write_log(path: Path, rows: list[dict]) -> None:
    """The whole log, atomically (a resumed fold drops rows past its checkpoint)."""
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _append_log(path: Path, row: dict) -> None:
    # One short line per epoch, so a run that dies keeps its history. A line cut short (kill,
    # full disk) is dropped on resume: the log is rewritten from the checkpoint's history.
    new = not path.exists()
    with explain_disk_full(path, "its earlier rows are kept and the checkpoint is intact"), \
            open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


# --------------------------------------------------------------------------- one fold

def _epoch_done(fold: int | str, epoch: int) -> None:
    """Called after each epoch's checkpoint; tests replace it to interrupt a run."""


def _set_backbone_frozen(model: ReIDModel, frozen: bool) -> None:
    """Frozen: no gradients (the modes are `_set_train_modes`'s)."""
    for param in model.backbone.parameters():
        param.requires_grad_(not frozen)


def _set_train_modes(model: ReIDModel, frozen: bool, freeze_bn: bool) -> None:
    """Training mode, except a frozen backbone (eval: its BatchNorm statistics do not drift
    either) and, with `freeze_bn`, the backbone's BatchNorm layers: on small data with strong
    augmentation, batch statistics overwrite the pretrained running statistics within a few
    hundred steps."""
    model.train()
    model.backbone.train(not frozen)
    if freeze_bn:
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _evaluate(model: ReIDModel, ema: ModelEma | None, paths: list[Path], labels: np.ndarray,
              cfg: Config, device: str, load) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Embeddings of every retrieval kind and their scores; `pair_auc`/`map` are the chosen
    `model.retrieval`'s. Uses the EMA weights when there are any."""
    with ema.applied(model) if ema else nullcontext():
        embs = embed_all(model, paths, cfg, device, load)
    scores = {}
    for kind in RETRIEVAL_MODES:
        for metric, value in score_embeddings(embs[kind], labels).items():
            scores[f"{metric}_{kind}"] = value
    chosen = cfg.model.retrieval
    scores.update(pair_auc=scores[f"pair_auc_{chosen}"], map=scores[f"map_{chosen}"])
    return embs, scores


def train_fold(cfg: Config, fold: int | str, folds_df: pd.DataFrame,
               paths: list[Path], load, train_load, device: str = "cpu") -> dict:
    """Train one fold (or `full`) and write its outputs; returns its metrics. `paths[i]` is
    the file of `folds_df` row i; `load` reads it (cached or source) and `train_load` reads it
    with the training-only augmentations.

    The writing process (rank 0 under torchrun: the other ranks write nothing) holds the fold's
    lock throughout, so a second run of the same fold is refused (`FoldBusyError`)."""
    if not distributed.is_main():
        return _train_fold(cfg, fold, folds_df, paths, load, train_load, device)
    out = fold_dir(cfg, fold)
    with fold_lock(out, f"experiment {cfg.exp!r}, fold {fold}"):
        # Safe under the lock: no other live process writes these files of this fold.
        stray = remove_stray_temps(out, FOLD_FILES)
        if stray:
            print(f"fold {fold}: removed {len(stray)} temporary file(s) a killed run left: "
                  + ", ".join(p.name for p in stray))
        return _train_fold(cfg, fold, folds_df, paths, load, train_load, device)


def _train_fold(cfg: Config, fold: int | str, folds_df: pd.DataFrame,
                paths: list[Path], load, train_load, device: str) -> dict:
    rank, world_size, local_rank = distributed.world()
    main = rank == 0
    out = fold_dir(cfg, fold)
    digest = _training_digest(cfg)
    metrics_path, ckpt_path, log_path = out / "metrics.json", out / "checkpoint.pt", out / "log.csv"
    if metrics_path.is_file() and not cfg.train.overwrite:
        previous = read_json(metrics_path)
        if previous.get("training_digest") != digest:
            raise ConfigError(
                f"{out} holds a finished fold trained with a different config; use a new exp=NAME "
                "or train.overwrite=true to replace it"
            )
        if main:
            print(f"fold {fold}: already finished in {out}; skipping "
                  "(train.overwrite=true retrains)")
        return previous
    resume = None
    if ckpt_path.is_file() and not cfg.train.overwrite:
        resume = load_checkpoint(ckpt_path)
        if resume.get("training_digest") != digest:
            raise ConfigError(f"{ckpt_path}: an unfinished run of a different config; use a new "
                              "exp=NAME, or train.overwrite=true to start this fold again")
    if main:
        out.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    if fold == FULL:
        is_val = np.zeros(len(folds_df), dtype=bool)
    else:
        is_val = (folds_df["fold"] == fold).to_numpy()
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    train_names = folds_df["ground_truth"].to_numpy()[train_idx]
    classes, counts = np.unique(train_names, return_counts=True)
    classes = [str(c) for c in classes]
    class_of = {name: i for i, name in enumerate(classes)}
    train_labels = [class_of[g] for g in train_names]
    val_paths = [paths[i] for i in val_idx]
    val_labels = folds_df["ground_truth"].to_numpy()[val_idx]
    has_val = len(val_idx) > 0

    model = build_model(cfg, n_classes=len(classes), counts=counts.tolist()).to(device)
    if world_size > 1 and device.startswith("cuda") and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg)
    try:
        sampler = TrainBatchSampler(train_labels, cfg.train.batch_size, cfg.seed,
                                    cfg.train.sampler, cfg.train.pk_k, rank, world_size,
                                    cfg.train.grad_accum)
    except ValueError as exc:
        raise ConfigError(f"fold {fold}: {exc}") from None
    train_set = ImageDataset([paths[i] for i in train_idx], train_labels,
                             build_transform(cfg, train=True), train_load)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.startswith("cuda"),
                        persistent_workers=cfg.data.num_workers > 0)
    steps_per_epoch = sampler.steps_per_epoch()
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    frozen_steps = min(cfg.train.freeze_epochs, cfg.train.epochs) * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambdas(optimizer, total_steps, warmup_steps, frozen_steps))
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
    dtype = amp_dtype(device, cfg.train.amp)
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    history: list[dict] = []
    best, best_epoch, stale, start_epoch = -float("inf"), 0, 0, 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        _set_rng_state(resume["rng"])
        history = list(resume["history"])
        best, best_epoch, stale = resume["best"], resume["best_epoch"], resume["stale"]
        start_epoch = resume["epoch"] + 1
        if main:
            _write_log(log_path, history)
            if has_val and best_epoch == resume["epoch"]:
                # The run may have died after its checkpoint and before (or while) it wrote
                # these best weights: they are the checkpoint's own.
                _save_weights(ema.shadow if ema else model.state_dict(),
                              out / "best.safetensors")
            print(f"fold {fold}: resuming after epoch {resume['epoch']} from {ckpt_path}")
        del resume
    elif main and log_path.exists():
        log_path.unlink()

    if main:
        print(f"fold {fold}: {len(train_idx)} train images of {len(classes)} identities, "
              f"{len(val_idx)} validation images; {cfg.model.backbone} on {device}"
              + (f" x {world_size} processes" if world_size > 1 else ""))
    started = time.time()
    if start_epoch == 1 and main:
        row = {"epoch": 0, "loss": float("nan"), "lr": 0.0, "images_per_s": 0.0, "seconds": 0.0}
        if has_val:
            _, scores = _evaluate(model, None, val_paths, val_labels, cfg, device, load)
            row.update(scores)
            print(f"fold {fold} epoch 0 (before training): " + _describe(scores))
        _append_log(log_path, row)
        history.append(row)

    step_module, step_frozen = None, None
    stop = False
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        frozen = epoch <= cfg.train.freeze_epochs
        if step_module is None or frozen != step_frozen:
            # DDP registers the parameters that need gradients when it is built, so it is
            # rebuilt when the backbone thaws.
            _set_backbone_frozen(model, frozen)
            step_module, step_frozen = TrainStep(model), frozen
            if world_size > 1:
                step_module = torch.nn.parallel.DistributedDataParallel(
                    step_module, device_ids=[local_rank] if device.startswith("cuda") else None)
            if cfg.train.compile:
                step_module = torch.compile(step_module)
        _set_train_modes(model, frozen, cfg.train.freeze_bn)
        sampler.set_epoch(epoch)
        epoch_start, seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(loader, desc=f"fold {fold} epoch {epoch}/{cfg.train.epochs}", leave=False,
                   mininterval=1.0, dynamic_ncols=True, disable=None if main else True)
        optimizer.zero_grad(set_to_none=True)
        for i, (images, labels, _) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            stepping = (i + 1) % cfg.train.grad_accum == 0
            # Between optimiser steps the gradients stay local; one all-reduce per step.
            sync = nullcontext() if stepping or world_size == 1 else step_module.no_sync()
            with sync:
                with torch.autocast(device.split(":")[0], dtype=dtype,
                                    enabled=dtype is not None):
                    logits = step_module(images, labels)
                loss = F.cross_entropy(logits.float(), labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fold {fold} epoch {epoch}: loss is {loss.item()}; "
                                             "lower train.lr or turn off train.amp")
                scaled = loss / cfg.train.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            if stepping:
                optimizer_step(model, optimizer, scaler, cfg.train.clip_grad)
                scheduler.step()
                if ema is not None:
                    ema.update(model)
            seen += len(images)
            loss_sum += loss.item() * len(images)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}",
                            img_s=f"{seen * world_size / (time.time() - epoch_start):.1f}")
        bar.close()
        row = {"epoch": epoch, "loss": loss_sum / max(seen, 1),
               "lr": max(g["lr"] for g in optimizer.param_groups),
               "images_per_s": seen * world_size / (time.time() - epoch_start),
               "seconds": round(time.time() - started, 1)}
        if main:
            if has_val:
                _, scores = _evaluate(model, ema, val_paths, val_labels, cfg, device, load)
                row.update(scores)
                value = scores[cfg.train.monitor]
                if value > best:
                    best, best_epoch, stale = value, epoch, 0
                else:
                    stale += 1
                stop = 0 < cfg.train.early_stop <= stale
            _append_log(log_path, row)
            history.append(row)
            print(f"fold {fold} epoch {epoch}: loss {row['loss']:.3f}  "
                  + (_describe(row) + "  " if has_val else "")
                  + f"{row['images_per_s']:.1f} img/s"
                  + (f"  (no gain for {stale} epochs: stopping early)" if stop else ""))
            save_checkpoint(ckpt_path, {
                "training_digest": digest, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema else None,
                "scaler": scaler.state_dict() if scaler else None, "rng": _rng_state(),
                "history": history, "best": best, "best_epoch": best_epoch, "stale": stale})
            if best_epoch == epoch and has_val:
                # After the checkpoint, never before: a run killed in between resumes from the
                # previous checkpoint, whose best epoch these weights must still be (on a GPU
                # the epoch run again need not score as well); a resume rewrites them.
                _save_weights(ema.shadow if ema else model.state_dict(),
                              out / "best.safetensors")
        stop = distributed.broadcast_flag(stop)
        distributed.barrier()
        _epoch_done(fold, epoch)
        if stop:
            break

    if not main:
        return {}
    final = ema.shadow if ema else model.state_dict()
    _save_weights(final, out / "model.safetensors")
    selected = "last"
    if cfg.train.select == "best" and has_val and best_epoch > 0:
        with atomic_path(out / "model.safetensors", suffix=".safetensors") as tmp:
            shutil.copyfile(out / "best.safetensors", tmp)
        selected = f"best (epoch {best_epoch})"
        model.load_state_dict(load_file(str(out / "best.safetensors"), device=str(device)))
        ema = None  # the best file already holds the averaged weights when EMA is on
    metrics: dict = {"fold": fold, "n_train": len(train_idx), "n_val": len(val_idx),
                     "classes": classes, "training_digest": digest, "weights": selected,
                     "epochs_run": history[-1]["epoch"], "best_epoch": best_epoch,
                     "seconds": round(time.time() - started, 1), "device": device,
                     "processes": world_size, "retrieval": cfg.model.retrieval}
    if has_val:
        embs, scores = _evaluate(model, ema, val_paths, val_labels, cfg, device, load)
        metrics.update(scores)
        metrics["untrained"] = {k: history[0][k] for k in scores}
        with atomic_path(out / "val_embeddings.npz", suffix=".npz") as tmp:
            np.savez(tmp, embeddings=embs[cfg.model.retrieval], **embs,
                     filenames=folds_df["filename"].to_numpy()[val_idx].astype(str),
                     labels=val_labels.astype(str))
    save_config(Config({**cfg, "fold": str(fold)}), out / "config.yaml")
    # Written last: its presence is what marks the fold as finished.
    atomic_write_json(metrics_path, metrics)
    ckpt_path.unlink(missing_ok=True)
    return metrics


def _describe(scores: dict) -> str:
    parts = [f"pair AUC {scores['pair_auc']:.4f}  mAP {scores['map']:.4f}"]
    parts.append("(mAP " + ", ".join(f"{k} {scores[f'map_{k}']:.4f}" for k in RETRIEVAL_MODES)
                 + ")")
    return "  ".join(parts)


# --------------------------------------------------------------------------- experiment

def prepare(cfg: Config) -> tuple[pd.DataFrame, list[Path], object, object]:
    """Image cache and folds file (made once, then only read), and the image loaders."""
    files = data_files(cfg)
    train_df = read_train_csv(files["train"])
    paths, load, records = prepare_images(cfg, train_df["filename"], files["train"],
                                          "train images")
    hashes = None if records is None else [r["phash"] for r in records]
    train_load = image_loader(cfg, cached=records is not None, train=True)
    folds_df = load_or_create_folds(cfg, train_df, hashes)
    return folds_df, paths, load, train_load


def run(cfg: Config) -> dict:
    """Train the folds `cfg.fold` asks for, then rewrite the experiment's out-of-fold report.
    Under torchrun every rank runs this; rank 0 alone writes."""
    start = time.perf_counter()
    folds_to_run = parse_fold_spec(cfg.fold, cfg.folds.n_folds)
    device = resolve_device(cfg.device)
    if distributed.launched_by_torchrun():
        device = distributed.init(device)
    try:
        folds_df, paths, load, train_load = prepare(cfg)
        exp_dir = Path(cfg.output_dir) / cfg.exp
        if distributed.is_main():
            exp_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, exp_dir / "config.yaml")
        results = {}
        for fold in folds_to_run:
            results[fold] = train_fold(cfg, fold, folds_df, paths, load, train_load, device)
        if distributed.is_main() and not os.environ.get(distributed.CHILD_ENV):
            if any(f != FULL for f in folds_to_run):
                score_experiment(exp_dir)
            after_run(cfg, "train", wall_s=time.perf_counter() - start, device=device)
        return results
    finally:
        distributed.shutdown()


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    if cfg.gpus > 1 and not distributed.launched_by_torchrun():
        prepare(cfg)  # the children find the cache and the folds ready, and do not race
        if cfg.parallel == "data":
            distributed.launch_data_parallel(argv, cfg.gpus)
            return
        folds = parse_fold_spec(cfg.fold, cfg.folds.n_folds)
        exp_dir = Path(cfg.output_dir) / cfg.exp
        cuda = resolve_device(cfg.device).startswith("cuda")
        start = time.perf_counter()
        distributed.launch_fold_parallel(argv, folds, cfg.gpus, exp_dir / "logs", cuda)
        if any(f != FULL for f in folds):
            score_experiment(exp_dir)
        after_run(cfg, "train", wall_s=time.perf_counter() - start,
                  device=f"{cfg.gpus} x {resolve_device(cfg.device)}")
        return
    run(cfg)


if __name__ == "__main__":
    run_main(main)
