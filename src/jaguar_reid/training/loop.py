"""Training of one fold: set-up, restore, epochs, end of epoch, finish.

A fold folder (`layout.fold_dir`) receives
  model.safetensors      the kept weights (`train.select`: last or best; EMA when `train.ema`)
  best.safetensors       the best weights by validation `train.monitor` (folds with validation)
  val_embeddings.npz     validation embeddings (L2-normalised): `embeddings` (the chosen
                         `model.retrieval`) and each of neck / backbone / both, with filenames
                         and labels
  metrics.json           validation scores of every retrieval embedding, classes, timing;
                         written last: the fold is finished (`layout.is_finished`)
  log.csv                one row per epoch (epoch 0 = before training: the floor)
  config.yaml            the resolved config of this fold
  checkpoint.pt          while training: everything needed to resume (removed when finished)
  train.lock             while training: held by the one process training the fold

A run that dies is started again with the same command: the fold resumes from its last
checkpoint (end of an epoch) and, on a CPU, ends bit-identical to a run that never stopped.
The checkpoint and the finished fold carry the training digest (`training.digest`), which holds
no paths, so a fold folder copied elsewhere resumes and skips the same way.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from jaguar_reid import layout
from jaguar_reid.config import Config, ConfigError, save_config
from jaguar_reid.data.augment import build_transform
from jaguar_reid.data.images import ImageDataset
from jaguar_reid.data.sampler import TrainBatchSampler
from jaguar_reid.io_utils import (
    UserInputError,
    amp_dtype,
    atomic_path,
    atomic_write_json,
    loader_workers,
    read_json,
    remove_stray_temps,
    seed_everything,
)
from jaguar_reid.keys import choices
from jaguar_reid.progress import bar as progress_bar
from jaguar_reid.training import distributed
from jaguar_reid.training.checkpoint import (
    append_log,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
    write_log,
)
from jaguar_reid.training.curves import NoCurves, open_curves
from jaguar_reid.training.digest import Digest, training_digest
from jaguar_reid.training.distill import distill_loss
from jaguar_reid.training.lock import fold_lock
from jaguar_reid.training.losses import Criterion
from jaguar_reid.training.model import RETRIEVAL_MODES, ReIDModel, TrainStep, build_model
from jaguar_reid.training.optim import ModelEma, build_optimizer, lr_lambdas, optimizer_step

SELECT = choices("train.select")  # weights kept as model.safetensors

# (model, image paths, labels) -> ({retrieval kind: embeddings}, scores): `pair_auc` and
# `map` of the chosen `model.retrieval`, and `<metric>_<kind>` of every kind.
Evaluate = Callable[[torch.nn.Module, list[Path], np.ndarray],
                    tuple[dict[str, np.ndarray], dict[str, float]]]


class TrainingDiverged(UserInputError, FloatingPointError):
    """The loss is no longer finite: a setting to change (learning rate, precision, weights);
    the last checkpoint is kept."""


@dataclass
class FoldHooks:
    """What the loop calls out to: validation (embedding and scoring live later in the
    pipeline) and an observer after each epoch's checkpoint (raise to stop the run there:
    the next run resumes from that checkpoint)."""

    evaluate: Evaluate
    after_epoch: Callable[[int | str, int], None] = lambda fold, epoch: None


@dataclass
class Extra:
    """Images beside train.csv's that join every fold's training side: pseudo-labelled test
    images (`identities` holds the name) and, for a distilled student, unlabelled test images
    (None)."""

    names: list[str]
    paths: list[Path]
    identities: list[str | None]


@dataclass
class Split:
    """A fold's training and validation images; a student's teacher embedding of each
    training image (`train_targets`, row i for `train_paths[i]`)."""

    train_paths: list[Path]
    train_labels: list[int]
    classes: list[str]
    counts: list[int]
    val_paths: list[Path]
    val_labels: np.ndarray
    val_names: np.ndarray
    n_extra: int = 0  # of the training images, those from `Extra`
    train_targets: torch.Tensor | None = None

    @property
    def has_val(self) -> bool:
        return len(self.val_paths) > 0


@dataclass
class Parts:
    """The objects that train: model, optimiser, schedule, EMA, loss scaler, batches, loss."""

    model: ReIDModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEma | None
    scaler: torch.amp.GradScaler | None
    sampler: TrainBatchSampler
    loader: DataLoader
    dtype: torch.dtype | None
    criterion: Criterion

    def kept_state(self) -> dict[str, torch.Tensor]:
        """The weights validation and saving use: the EMA average when there is one."""
        return self.ema.shadow if self.ema else self.model.state_dict()


@dataclass
class State:
    """Where the fold stands; saved in every checkpoint."""

    epoch: int = 0  # last finished epoch
    history: list[dict] = field(default_factory=list)
    best: float = -float("inf")
    best_epoch: int = 0
    stale: int = 0  # epochs since the best
    stop: bool = False


@dataclass
class Run:
    """One fold's run: what it trains on, with what, where it writes."""

    cfg: Config
    fold: int | str
    out: Path
    digest: Digest
    split: Split
    hooks: FoldHooks
    device: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: float = field(default_factory=time.time)
    curves: NoCurves = field(default_factory=NoCurves)  # report.tensorboard's event files

    @property
    def main(self) -> bool:
        """The writing process (rank 0)."""
        return self.rank == 0

    def path(self, name: str) -> Path:
        return self.out / name


# --------------------------------------------------------------------------- set-up

def split_fold(folds_df: pd.DataFrame, fold: int | str, paths: list[Path],
               extra: Extra | None = None, targets: np.ndarray | None = None) -> Split:
    """The fold's images. `extra` images join the training side when unlabelled or of an
    identity the fold trains on (never a new one: grouped folds keep their validation
    identities unseen). `targets`: one row per `folds_df` row, then per `extra` image."""
    is_val = (np.zeros(len(folds_df), dtype=bool) if fold == layout.FULL
              else (folds_df["fold"] == fold).to_numpy())
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    truth = folds_df["ground_truth"].to_numpy()
    classes = np.unique(truth[train_idx])
    class_of = {name: i for i, name in enumerate(classes)}
    labels = [class_of[g] for g in truth[train_idx]]
    extra = extra or Extra([], [], [])
    kept = [i for i, name in enumerate(extra.identities) if name is None or name in class_of]
    labels += [-1 if extra.identities[i] is None else class_of[extra.identities[i]]
               for i in kept]
    rows = np.r_[train_idx, len(folds_df) + np.array(kept, dtype=np.int64)]
    return Split(train_paths=[paths[i] for i in train_idx] + [extra.paths[i] for i in kept],
                 train_labels=labels, classes=[str(c) for c in classes],
                 counts=np.bincount([c for c in labels if c >= 0],
                                    minlength=len(classes)).tolist(),
                 val_paths=[paths[i] for i in val_idx], val_labels=truth[val_idx],
                 val_names=folds_df["filename"].to_numpy()[val_idx].astype(str),
                 n_extra=len(kept),
                 train_targets=None if targets is None else torch.from_numpy(
                     np.ascontiguousarray(targets[rows], dtype=np.float32)))


def load_init(cfg: Config, fold: int | str, model: ReIDModel, classes: list[str]) -> None:
    """`train.init`: the same fold of another experiment as the starting weights, its head
    included, so its identities must be this fold's."""
    directory = layout.fold_dir(layout.model_dir(cfg, cfg.train.init), fold)
    if not layout.is_finished(directory):
        raise ConfigError(f"train.init={cfg.train.init}: fold {fold} is not finished in "
                          f"{directory}; train it first, or choose another experiment")
    theirs = read_json(directory / layout.FOLD_METRICS).get("classes")
    if theirs != classes:
        raise ConfigError(f"train.init={cfg.train.init}: fold {fold} was trained on "
                          f"{len(theirs or [])} identities, this fold trains on {len(classes)} "
                          "other ones; start from an experiment trained on the same folds file")
    weights = directory / layout.MODEL_WEIGHTS
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"train.init={cfg.train.init}: {weights} cannot be read ({exc}); "
                          "train that fold again") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line or "key(s)" in line),
                      lines[0])
        raise ConfigError(f"train.init={cfg.train.init}: {weights} does not fit "
                          f"model.backbone={cfg.model.backbone!r}: {detail[:200]}") from None


def build_parts(run: Run, train_load) -> Parts:
    cfg, split, device = run.cfg, run.split, run.device
    model = build_model(cfg, n_classes=len(split.classes), counts=split.counts)
    if cfg.train.init:  # before the EMA copies the weights; a resumed run restores its own
        load_init(cfg, run.fold, model, split.classes)
    model = model.to(device)
    if run.world_size > 1 and device.startswith("cuda") and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg)
    try:
        sampler = TrainBatchSampler(split.train_labels, cfg.train.batch_size, cfg.seed,
                                    cfg.train.sampler, cfg.train.pk_k, run.rank, run.world_size,
                                    cfg.train.grad_accum)
    except ValueError as exc:
        raise ConfigError(f"fold {run.fold}: {exc}") from None
    dataset = ImageDataset(split.train_paths, split.train_labels,
                           build_transform(cfg, train=True), train_load)
    workers = loader_workers(cfg.data.num_workers)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        pin_memory=device.startswith("cuda"),
                        persistent_workers=workers > 0)
    steps = sampler.steps_per_epoch()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(
        optimizer, steps * cfg.train.epochs, int(round(cfg.train.warmup_epochs * steps)),
        min(cfg.train.freeze_epochs, cfg.train.epochs) * steps))
    dtype = amp_dtype(device, cfg.train.amp, cfg.train.amp_dtype)
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
    criterion = Criterion(cfg, cfg.model.embed_dim).to(device)
    return Parts(model, optimizer, scheduler, ema, scaler, sampler, loader, dtype, criterion)


# --------------------------------------------------------------------------- restore

def finished_result(run: Run) -> dict | None:
    """A finished fold's metrics when this recipe made them (then it is skipped); an error
    when another recipe did; None when the fold is to be trained."""
    if not layout.is_finished(run.out) or run.cfg.train.overwrite:
        return None
    previous = read_json(run.path(layout.FOLD_METRICS))
    if not run.digest.matches(previous.get("training_digest")):
        raise ConfigError(f"{run.out} holds a finished fold trained with a different config; "
                          "use a new exp=NAME or train.overwrite=true to replace it")
    if run.main:
        print(f"fold {run.fold}: already finished in {run.out}; skipping "
              "(train.overwrite=true retrains)")
    return previous


def read_resume(run: Run) -> dict | None:
    path = run.path(layout.CHECKPOINT)
    if not path.is_file() or run.cfg.train.overwrite:
        return None
    resume = load_checkpoint(path)
    if not run.digest.matches(resume.get("training_digest")):
        raise ConfigError(f"{path}: an unfinished run of a different config; use a new "
                          "exp=NAME, or train.overwrite=true to start this fold again")
    return resume


def restore(run: Run, parts: Parts, resume: dict) -> State:
    """Every piece of state from the checkpoint; the log is rewritten from its history."""
    parts.model.load_state_dict(resume["model"])
    parts.optimizer.load_state_dict(resume["optimizer"])
    parts.scheduler.load_state_dict(resume["scheduler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(resume["ema"])
    if parts.scaler is not None and resume.get("scaler"):
        parts.scaler.load_state_dict(resume["scaler"])
    parts.criterion.load_memory_state(resume.get("criterion") or {})
    set_rng_state(resume["rng"])
    state = State(epoch=resume["epoch"], history=list(resume["history"]), best=resume["best"],
                  best_epoch=resume["best_epoch"], stale=resume["stale"])
    if run.main:
        write_log(run.path(layout.TRAIN_LOG), state.history)
        if run.split.has_val and state.best_epoch == state.epoch:
            # The run may have died after its checkpoint and before (or while) it wrote these
            # best weights: they are the checkpoint's own.
            save_weights(parts.kept_state(), run.path(layout.BEST_WEIGHTS))
        print(f"fold {run.fold}: resuming after epoch {state.epoch} from "
              f"{run.path(layout.CHECKPOINT)}")
    return state


def evaluate(run: Run, parts: Parts, use_ema: bool = True):
    """Validation embeddings and scores, with the EMA weights when there are any."""
    with parts.ema.applied(parts.model) if parts.ema and use_ema else nullcontext():
        return run.hooks.evaluate(parts.model, run.split.val_paths, run.split.val_labels)


def start(run: Run, parts: Parts) -> State:
    """A fresh fold: the log starts with epoch 0, the model before training (the floor)."""
    state = State()
    if not run.main:
        return state
    run.path(layout.TRAIN_LOG).unlink(missing_ok=True)
    row = {"epoch": 0, "loss": float("nan"), "lr": 0.0, "images_per_s": 0.0, "seconds": 0.0}
    if run.split.has_val:
        _, scores = evaluate(run, parts, use_ema=False)
        row.update(scores)
        print(f"fold {run.fold} epoch 0 (before training): " + describe(scores))
    append_log(run.path(layout.TRAIN_LOG), row)
    run.curves.epoch(parts.scheduler.last_epoch, row)
    state.history.append(row)
    return state


# --------------------------------------------------------------------------- one epoch

def _set_backbone_frozen(model: ReIDModel, frozen: bool) -> None:
    """Frozen: no gradients (the modes are `set_train_modes`'s)."""
    for param in model.backbone.parameters():
        param.requires_grad_(not frozen)


def set_train_modes(model: ReIDModel, frozen: bool, freeze_bn: bool) -> None:
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


class StepModule:
    """The forward the loop differentiates: TrainStep, wrapped in DDP and torch.compile as
    asked; rebuilt when the backbone thaws (DDP registers the parameters that need gradients
    when it is built)."""

    def __init__(self, run: Run, parts: Parts) -> None:
        self.run, self.parts = run, parts
        self.module, self.frozen = None, None

    def for_epoch(self, epoch: int) -> torch.nn.Module:
        frozen = epoch <= self.run.cfg.train.freeze_epochs
        if self.module is None or frozen != self.frozen:
            _set_backbone_frozen(self.parts.model, frozen)
            distilled = self.run.split.train_targets is not None
            head = not distilled and self.run.cfg.loss.arcface > 0
            module = TrainStep(self.parts.model, head=head)
            if self.run.world_size > 1:
                cuda = self.run.device.startswith("cuda")
                # Without its loss the ArcFace head receives no gradient.
                module = torch.nn.parallel.DistributedDataParallel(
                    module, device_ids=[self.run.local_rank] if cuda else None,
                    find_unused_parameters=not head)
            if self.run.cfg.train.compile:
                module = torch.compile(module)
            self.module, self.frozen = module, frozen
        set_train_modes(self.parts.model, frozen, self.run.cfg.train.freeze_bn)
        return self.module


def train_epoch(run: Run, parts: Parts, step_module: torch.nn.Module, epoch: int) -> dict:
    """One pass over the training batches; the epoch's log row (loss, lr, speed)."""
    cfg, device = run.cfg, run.device
    parts.sampler.set_epoch(epoch)
    epoch_start, seen, loss_sum, step_loss = time.time(), 0, 0.0, 0.0
    bar = progress_bar(parts.loader, desc=f"fold {run.fold} epoch {epoch}/{cfg.train.epochs}",
                       main=run.main)
    parts.optimizer.zero_grad(set_to_none=True)
    targets = run.split.train_targets
    for i, (images, labels, index) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        target = None if targets is None else targets[index].to(device, non_blocking=True)
        stepping = (i + 1) % cfg.train.grad_accum == 0
        # Between optimiser steps the gradients stay local; one all-reduce per step.
        sync = nullcontext() if stepping or run.world_size == 1 else step_module.no_sync()
        with sync:
            loss = backward_step(run, parts, step_module, images, labels, epoch, target)
        step_loss += loss
        if stepping:
            # The step about to be taken, with the learning rate it uses.
            run.curves.step(parts.scheduler.last_epoch + 1, step_loss / cfg.train.grad_accum,
                            parts.optimizer)
            step_loss = 0.0
            optimizer_step(parts.model, parts.optimizer, parts.scaler, cfg.train.clip_grad)
            parts.scheduler.step()
            if parts.ema is not None:
                parts.ema.update(parts.model)
        seen += len(images)
        loss_sum += loss * len(images)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}",
                        img_s=f"{seen * run.world_size / (time.time() - epoch_start):.1f}")
    bar.close()
    return {"epoch": epoch, "loss": loss_sum / max(seen, 1),
            "lr": max(g["lr"] for g in parts.optimizer.param_groups),
            "images_per_s": seen * run.world_size / (time.time() - epoch_start),
            "seconds": round(time.time() - run.started, 1)}


def backward_step(run: Run, parts: Parts, step_module: torch.nn.Module, images: torch.Tensor,
                  labels: torch.Tensor, epoch: int, targets: torch.Tensor | None = None
                  ) -> float:
    """Forward, loss, backward of one batch: the configured losses (`Criterion`), or with the
    teacher's embeddings of the batch (`targets`) the student's distillation loss."""
    with torch.autocast(run.device.split(":")[0], dtype=parts.dtype,
                        enabled=parts.dtype is not None):
        emb, logits = step_module(images, labels)
    if targets is None:
        loss = parts.criterion(emb, logits, labels)
    else:
        loss = distill_loss(emb, targets, labels, run.cfg.train.distill_loss,
                            run.cfg.train.distill_margin)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"fold {run.fold} epoch {epoch}: loss is {loss.item()}; "
                                 "lower train.lr or turn off train.amp")
    scaled = loss / run.cfg.train.grad_accum
    (parts.scaler.scale(scaled) if parts.scaler else scaled).backward()
    return loss.item()


# --------------------------------------------------------------------------- end of epoch

def end_epoch(run: Run, parts: Parts, state: State, row: dict) -> None:
    """Validate, log, checkpoint, keep the best weights (the writing process only)."""
    state.epoch = row["epoch"]
    if not run.main:
        return
    if run.split.has_val:
        _, scores = evaluate(run, parts)
        row.update(scores)
        value = scores[run.cfg.train.monitor]
        if value > state.best:
            state.best, state.best_epoch, state.stale = value, state.epoch, 0
        else:
            state.stale += 1
        state.stop = 0 < run.cfg.train.early_stop <= state.stale
    append_log(run.path(layout.TRAIN_LOG), row)
    state.history.append(row)
    print(f"fold {run.fold} epoch {state.epoch}: loss {row['loss']:.3f}  "
          + (describe(row) + "  " if run.split.has_val else "")
          + f"{row['images_per_s']:.1f} img/s"
          + (f"  (no gain for {state.stale} epochs: stopping early)" if state.stop else ""))
    run.curves.epoch(parts.scheduler.last_epoch, row)
    save_checkpoint(run.path(layout.CHECKPOINT), checkpoint_state(run, parts, state))
    if state.best_epoch == state.epoch and run.split.has_val:
        # After the checkpoint, never before: a run killed in between resumes from the
        # previous checkpoint, whose best epoch these weights must still be (on a GPU the
        # epoch run again need not score as well); a resume rewrites them.
        save_weights(parts.kept_state(), run.path(layout.BEST_WEIGHTS))


def checkpoint_state(run: Run, parts: Parts, state: State) -> dict:
    return {"training_digest": run.digest.current, "epoch": state.epoch,
            "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema else None,
            "scaler": parts.scaler.state_dict() if parts.scaler else None, "rng": rng_state(),
            "criterion": parts.criterion.memory_state(),
            "history": state.history, "best": state.best, "best_epoch": state.best_epoch,
            "stale": state.stale}


def describe(scores: dict) -> str:
    parts = [f"pair AUC {scores['pair_auc']:.4f}  mAP {scores['map']:.4f}"]
    parts.append("(mAP " + ", ".join(f"{k} {scores[f'map_{k}']:.4f}" for k in RETRIEVAL_MODES)
                 + ")")
    return "  ".join(parts)


# --------------------------------------------------------------------------- finish

def finish(run: Run, parts: Parts, state: State) -> dict:
    """The kept weights, the validation embeddings, the fold's config, then metrics.json."""
    save_weights(parts.kept_state(), run.path(layout.MODEL_WEIGHTS))
    selected, use_ema = "last", True
    if run.cfg.train.select == "best" and run.split.has_val and state.best_epoch > 0:
        with atomic_path(run.path(layout.MODEL_WEIGHTS), suffix=".safetensors") as tmp:
            shutil.copyfile(run.path(layout.BEST_WEIGHTS), tmp)
        selected = f"best (epoch {state.best_epoch})"
        parts.model.load_state_dict(load_file(str(run.path(layout.BEST_WEIGHTS)),
                                              device=str(run.device)))
        use_ema = False  # the best file already holds the averaged weights when EMA is on
    split = run.split
    metrics: dict = {"fold": run.fold, "n_train": len(split.train_paths),
                     "n_extra": split.n_extra,
                     "n_val": len(split.val_paths), "classes": split.classes,
                     "training_digest": run.digest.current, "weights": selected,
                     "epochs_run": state.history[-1]["epoch"], "best_epoch": state.best_epoch,
                     "seconds": round(time.time() - run.started, 1), "device": run.device,
                     "processes": run.world_size, "retrieval": run.cfg.model.retrieval}
    if split.has_val:
        embs, scores = evaluate(run, parts, use_ema)
        metrics.update(scores)
        metrics["untrained"] = {k: state.history[0][k] for k in scores}
        with atomic_path(run.path(layout.VAL_EMBEDDINGS), suffix=".npz") as tmp:
            np.savez(tmp, embeddings=embs[run.cfg.model.retrieval], **embs,
                     filenames=split.val_names, labels=split.val_labels.astype(str))
    save_config(Config({**run.cfg, "fold": str(run.fold)}), run.path(layout.RUN_CONFIG))
    # Written last: its presence is what marks the fold as finished.
    atomic_write_json(run.path(layout.FOLD_METRICS), metrics)
    run.path(layout.CHECKPOINT).unlink(missing_ok=True)
    return metrics


# --------------------------------------------------------------------------- one fold

def train_fold(cfg: Config, fold: int | str, folds_df: pd.DataFrame, paths: list[Path],
               train_load, hooks: FoldHooks, device: str = "cpu", extra: Extra | None = None,
               targets: np.ndarray | None = None) -> dict:
    """Train one fold (or `full`) into `<model folder>/fold<k>/`; returns its metrics.
    `paths[i]` is the file of `folds_df` row i, `train_load` reads it with the training-only
    augmentations; `extra` and `targets` as `split_fold` takes them.

    The writing process (rank 0 under torchrun: the other ranks write nothing) holds the fold's
    lock throughout, so a second run of the same fold is refused (`FoldBusyError`)."""
    rank, world_size, local_rank = distributed.world()
    run = Run(cfg, fold, layout.fold_dir(layout.model_dir(cfg), fold),
              training_digest(cfg, folds_df),
              split_fold(folds_df, fold, paths, extra, targets), hooks, device, rank,
              world_size, local_rank)
    if not run.main:
        return _train(run, train_load)
    with fold_lock(run.out, f"experiment {cfg.exp!r}, fold {fold}"):
        # Safe under the lock: no other live process writes these files of this fold.
        stray = remove_stray_temps(run.out, layout.FOLD_FILES)
        if stray:
            print(f"fold {fold}: removed {len(stray)} temporary file(s) a killed run left: "
                  + ", ".join(p.name for p in stray))
        try:
            return _train(run, train_load)
        finally:
            run.curves.close()


def _train(run: Run, train_load) -> dict:
    done = finished_result(run)
    if done is not None:
        return done
    resume = read_resume(run)
    if run.main:
        # Before the model is built: without the extra this stops at once.
        run.curves = open_curves(run.cfg.report.tensorboard, run.out, None if resume is None
                                 else resume["scheduler"]["last_epoch"])
        run.out.mkdir(parents=True, exist_ok=True)
        if run.cfg.train.overwrite:
            # Unfinished before anything new is written: a run killed while retraining
            # leaves a fold to resume, never the earlier metrics beside a new log.
            run.path(layout.FOLD_METRICS).unlink(missing_ok=True)
    seed_everything(run.cfg.seed)
    parts = build_parts(run, train_load)
    state = restore(run, parts, resume) if resume is not None else None
    del resume
    if run.main:
        split = run.split
        print(f"fold {run.fold}: {len(split.train_paths)} train images of "
              f"{len(split.classes)} identities"
              + (f" ({split.n_extra} of them test images)" if split.n_extra else "")
              + f", {len(split.val_paths)} validation images; "
              f"{run.cfg.model.backbone} on {run.device}"
              + (f" x {run.world_size} processes" if run.world_size > 1 else ""))
    state = state or start(run, parts)
    step = StepModule(run, parts)
    for epoch in range(state.epoch + 1, run.cfg.train.epochs + 1):
        row = train_epoch(run, parts, step.for_epoch(epoch), epoch)
        end_epoch(run, parts, state, row)
        state.stop = distributed.broadcast_flag(state.stop)
        distributed.barrier()
        run.hooks.after_epoch(run.fold, epoch)
        if state.stop:
            break
    return finish(run, parts, state) if run.main else {}
