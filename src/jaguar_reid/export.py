"""`python -m jaguar_reid.export exp=NAME out=DIR [export.half=true] [export.onnx=true]`:
a trained experiment as a self-contained folder to carry to another machine (a Kaggle dataset).

`out=DIR` is short for `export.dir=DIR`; `exps=a,b` exports several experiments, each into
`DIR/<exp>/`. The experiment is read from its model folder (`models=` works) and its work
folder (the tuned post-processing, the out-of-fold scores), and `DIR/<exp>/` gets what
`submit.py models=DIR exp=NAME`, the tuning, the report and identification read: the
experiment's config and folds file, `postprocess.json` / `.md`, `oof_scores.json` / `.md`, the
identification's calibration and gallery (`identify.json` / `.md`, `identify_gallery.npz`,
where python -m jaguar_reid.identify.calibrate made them; a gallery embedded by other weights
than the folds' is refused), and for each finished fold its weights, saved config, validation
embeddings, log and metrics. Never checkpoints, locks,
the best epoch's extra weights or view embeddings (the work folder remakes those). Last comes
`manifest.json` (each file's size and sha256, the commit, the library versions), which
`submit.py` checks before it reads anything.

`export.half=true` stores floating weights in fp16 (half the bytes; loading widens them back
into the fp32 model); `export.onnx=true` adds one ONNX embedding model per fold
(`jaguar_reid.retrieval.onnx`). On seeded probe images, fp16 weights are checked against the
fp32 ones and each ONNX model against PyTorch (with onnxruntime, where installed) before the
export is finished; what they measured goes into the manifest. The exported identification
gallery names the weights it is exported with (fp16 ones too, once checked: its embeddings
stay the fp32 models'). The folder is built beside
the target under a hidden name and renamed into place at the end: a killed export never
leaves a folder that looks finished, and an existing non-empty `DIR/<exp>/` is never
touched.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from jaguar_reid import layout
from jaguar_reid.config import Config, experiment_names, load_config, to_plain
from jaguar_reid.identify import files as identify_files
from jaguar_reid.identify.gallery import Gallery, read_gallery, save_gallery
from jaguar_reid.io_utils import UserInputError, atomic_path, read_json
from jaguar_reid.manifest import file_sha256, verify_manifest, write_manifest
from jaguar_reid.reporting.runs import code_version
from jaguar_reid.retrieval.embedding import fold_config
from jaguar_reid.retrieval.onnx import (
    ONNX_TOLERANCE,
    export_onnx,
    onnx_difference,
    probe_images,
    torch_embed,
)
from jaguar_reid.training.model import load_trained_model

# The experiment's files, in the model folder; and those a later step may have rewritten in
# the work folder (read with `layout.read_path`, the work folder's first).
EXP_MODEL_FILES = (layout.RUN_CONFIG, layout.EXP_FOLDS)
EXP_LATER_FILES = (layout.POST_CHOICE, layout.POST_CHOICE_MD, layout.OOF_SCORES,
                   layout.OOF_SCORES_MD, *identify_files.EXPERIMENT_FILES)
# A fold's files that are copied as they are; the weights are written apart and the metrics
# last (a fold is finished when its metrics are there).
FOLD_COPIED = (layout.RUN_CONFIG, layout.VAL_EMBEDDINGS, layout.TRAIN_LOG)
# Libraries whose versions the manifest records (the export's and the submission's code).
LIBRARIES = ("jaguar-reid", "torch", "torchvision", "timm", "numpy", "safetensors", "pandas",
             "albumentations", "onnx", "onnxruntime")
HALF_MIN_COSINE = 0.99  # fp16 weights: each probe embedding at least this close to fp32's
PROBE_IMAGES = 4


class ExportError(UserInputError):
    """An export that cannot be made as asked; the message names the folder or key."""


@dataclass
class Plan:
    """One experiment's export, checked before anything is written."""

    exp: str
    source: Path
    target: Path
    folds: list
    exp_files: dict[str, Path]
    checks: dict = field(default_factory=dict)  # per fold: what the checks measured


def command_line(argv: list[str]) -> list[str]:
    """`out=DIR` -> `export.dir=DIR` (the schema has no top-level `out` key)."""
    args = [f"export.dir={a[4:]}" if a.startswith("out=") else a for a in argv]
    if sum(a.startswith("export.dir=") for a in args) > 1:
        raise ExportError("command line: give the folder to write once, as out=DIR "
                          "(or export.dir=DIR)")
    return args


def plan_export(cfg: Config, exp: str, out_root: Path) -> Plan:
    """What exporting `exp` into `out_root/<exp>/` copies; every refusal happens here."""
    source = layout.model_dir(cfg, exp)
    if not source.is_dir():
        raise ExportError(f"experiment {exp!r}: no model folder {source} (train it, or point "
                          "models= at it)")
    target = out_root / exp
    if target.resolve() == source.resolve():
        raise ExportError(f"{target}: that is the experiment's own folder; choose another out=")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} already exists and is not empty; an export never "
                          "replaces one: choose another out=DIR, or delete that folder first")
    finished = layout.finished_folds(source, full=True)
    for directory in layout.fold_dirs(source):
        if layout.fold_of(directory) not in finished:
            print(f"{exp}: skipping {directory.name}, unfinished (no {layout.FOLD_METRICS})")
    if not finished:
        raise ExportError(f"{source}: no finished fold (fold<k>/{layout.FOLD_METRICS}) to "
                          "export; train one first")
    for fold in finished:
        directory = layout.fold_dir(source, fold)
        absent = [n for n in (layout.MODEL_WEIGHTS, layout.RUN_CONFIG)
                  if not (directory / n).is_file()]
        if absent:
            raise ExportError(f"{directory}: a finished fold without {', '.join(absent)}; "
                              "copy the whole fold folder, or train the fold again")
    exp_files = {n: source / n for n in EXP_MODEL_FILES}
    exp_files |= {n: layout.read_path(cfg, n, exp) for n in EXP_LATER_FILES}
    absent = [name for name, path in exp_files.items() if not path.is_file()]
    if absent:
        # One line: an experiment that was never tuned or calibrated lacks several at once.
        print(f"{exp}: not made, so not exported: {', '.join(absent)}")
    exp_files = {name: path for name, path in exp_files.items() if name not in absent}
    calibrated = [n for n in identify_files.EXPERIMENT_FILES if n in exp_files]
    if calibrated:
        check_calibrated(cfg, exp, {n: exp_files[n] for n in calibrated}, source, finished)
    return Plan(exp, source, target, finished, exp_files)


def check_calibrated(cfg: Config, exp: str, found: dict[str, Path], source: Path,
                     finished: list) -> None:
    """The identification files are one calibrate run's, all there, for these weights."""
    again = f"run python -m jaguar_reid.identify.calibrate exp={exp} again"
    absent = [n for n in identify_files.EXPERIMENT_FILES if n not in found]
    if absent:
        raise ExportError(f"{exp}: {', '.join(found)} without {', '.join(absent)}; {again}")
    gallery = read_gallery(found[identify_files.GALLERY])
    run_id = read_json(found[identify_files.CALIBRATION]).get("run_id", "")
    if gallery.run_id != run_id:
        raise ExportError(f"{exp}: {found[identify_files.CALIBRATION]} and "
                          f"{found[identify_files.GALLERY]} were written by two different "
                          f"calibrate runs; {again}")
    check_gallery(cfg, exp, gallery, source, finished)


def check_gallery(cfg: Config, exp: str, gallery: Gallery, source: Path,
                  finished: list) -> None:
    """The identification gallery was embedded by the weights the export carries."""
    from jaguar_reid.training.digest import weights_digest

    exported = {layout.fold_name(f) for f in finished}
    for fold, digest in zip(gallery.folds, gallery.digests, strict=True):
        weights = layout.fold_dir(source, int(fold)) / layout.MODEL_WEIGHTS
        if layout.fold_name(int(fold)) not in exported or \
                weights_digest(cfg, weights) != digest:
            raise ExportError(f"{exp}: its {identify_files.GALLERY} was embedded by other "
                              f"weights than {weights} (retrained since the calibration); run "
                              f"python -m jaguar_reid.identify.calibrate exp={exp} again")


def sign_gallery(staging: Path) -> None:
    """The exported gallery names the exported weights (other bytes than the source's with
    export.half, whose embeddings were checked against the fp32 ones)."""
    path = staging / identify_files.GALLERY
    if not path.is_file():
        return
    gallery = read_gallery(path)
    digests = tuple(file_sha256(layout.fold_dir(staging, int(f)) / layout.MODEL_WEIGHTS)
                    for f in gallery.folds)
    if digests != gallery.digests:
        with atomic_path(path, suffix=".npz") as tmp:
            save_gallery(replace(gallery, digests=digests), tmp)


def copy_file(source: Path, target: Path) -> None:
    with atomic_path(target, suffix=source.suffix) as tmp:
        shutil.copyfile(source, tmp)


def write_half(source: Path, target: Path) -> list[str]:
    """The weights with every fp32 tensor stored as fp16; a tensor that fp16 cannot hold
    (finite values past its range) stays fp32. Returns the names kept in fp32."""
    state, out, kept = load_file(str(source)), {}, []
    for name, tensor in state.items():
        if tensor.dtype == torch.float32:
            half = tensor.half()
            if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(tensor).all()):
                tensor = half
            else:
                kept.append(name)
        out[name] = tensor.contiguous()
    # Bytes written into the temporary file, not save_file: that makes a new file, private
    # (0600), where the export's files get the usual mode.
    data = save(out, metadata={"format": "pt"})
    with atomic_path(target, suffix=".safetensors") as tmp:
        tmp.write_bytes(data)
    return kept


def half_cosine(fold_cfg: Config, source: Path, model: torch.nn.Module, what: str) -> float:
    """The least cosine between the fp16 model's embeddings of probe images and those of the
    fp32 weights it came from; an error below `HALF_MIN_COSINE`."""
    kind = fold_cfg.model.retrieval
    images = probe_images(fold_cfg, PROBE_IMAGES)
    reference = torch_embed(load_trained_model(fold_cfg, source), kind, images)
    if not np.isfinite(reference).all():
        raise ExportError(f"{source}: the weights embed probe images as NaN or infinity; the "
                          "weights are damaged or the fold diverged: train it again")
    got = torch_embed(model, kind, images)
    cosine = float(np.min(np.sum(reference.astype(np.float64) * got, axis=1)))
    if not cosine >= HALF_MIN_COSINE:  # NaN too
        raise ExportError(f"{what}: the fp16 weights embed probe images with cosine {cosine:.4f}"
                          f" to the fp32 ones (below {HALF_MIN_COSINE}); export without "
                          "export.half=true")
    return cosine


def export_fold(cfg: Config, plan: Plan, fold: int | str, staging: Path) -> dict:
    """One finished fold into `staging`; returns what its checks measured."""
    source, target = layout.fold_dir(plan.source, fold), layout.fold_dir(staging, fold)
    what = f"{plan.exp} {layout.fold_name(fold)}"
    for name in FOLD_COPIED:
        if (source / name).is_file():
            copy_file(source / name, target / name)
    weights = target / layout.MODEL_WEIGHTS
    measured: dict = {}
    if cfg.export.half:
        kept = write_half(source / layout.MODEL_WEIGHTS, weights)
        measured["kept_fp32"] = kept
    else:
        copy_file(source / layout.MODEL_WEIGHTS, weights)
    if cfg.export.half or cfg.export.onnx:
        fold_cfg, _ = fold_config(cfg, plan.exp, fold)
        model = load_trained_model(fold_cfg, weights)
        if cfg.export.half:
            measured["half_min_cosine"] = half_cosine(fold_cfg, source / layout.MODEL_WEIGHTS,
                                                      model, what)
        if cfg.export.onnx:
            measured["onnx_max_abs_diff"] = write_onnx(cfg, fold_cfg, model,
                                                       target / layout.ONNX_MODEL, what)
    copy_file(source / layout.FOLD_METRICS, target / layout.FOLD_METRICS)
    notes = {"half_min_cosine": "fp16 vs fp32 embeddings: least cosine {:.7f}",
             "onnx_max_abs_diff": "onnxruntime vs PyTorch: largest difference {:.1e}"}
    print(f"{what}: exported" + "".join(f"; {notes[k].format(v)}" for k, v in measured.items()
                                         if k in notes and v is not None))
    if measured.get("kept_fp32"):
        print(f"{what}: kept in fp32 (values past fp16's range): "
              f"{', '.join(measured['kept_fp32'])}")
    return measured


def write_onnx(cfg: Config, fold_cfg: Config, model: torch.nn.Module, path: Path,
               what: str) -> float | None:
    """The fold's ONNX model, checked against PyTorch with onnxruntime where installed."""
    export_onnx(model, fold_cfg, path, cfg.export.onnx_opset)
    diff = onnx_difference(path, model, fold_cfg)
    if diff is None:
        print(f"{what}: onnxruntime is not installed; the ONNX model was not checked")
    elif not diff <= ONNX_TOLERANCE:  # NaN too
        raise ExportError(f"{what}: onnxruntime's embedding differs from PyTorch's by {diff:.2e}"
                          f" (more than {ONNX_TOLERANCE}); try another export.onnx_opset")
    return diff


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def manifest_extra(cfg: Config, plan: Plan) -> dict:
    version = code_version()
    return {"experiment": plan.exp, "source": str(plan.source.resolve()),
            "commit": version["commit"], "dirty": version["dirty"],
            "versions": library_versions(), "export": to_plain(cfg.export),
            "folds": [str(f) for f in plan.folds],
            "checks": {layout.fold_name(f): m for f, m in plan.checks.items()}}


def export_experiment(cfg: Config, plan: Plan) -> Path:
    """Build the export under a hidden name beside the target, manifest last, then rename it
    into place."""
    plan.target.parent.mkdir(parents=True, exist_ok=True)
    staging = plan.target.parent / f".{plan.exp}.{secrets.token_hex(4)}.export.tmp"
    staging.mkdir()
    try:
        for name, path in plan.exp_files.items():
            copy_file(path, staging / name)
        for fold in plan.folds:
            plan.checks[fold] = export_fold(cfg, plan, fold, staging)
        sign_gallery(staging)
        write_manifest(staging, manifest_extra(cfg, plan))
        verify_manifest(staging)  # what was written reads back as the manifest says
        try:
            os.rename(staging, plan.target)  # over an empty folder too (POSIX)
        except OSError as exc:
            raise ExportError(f"{plan.target}: could not put the export in place ({exc}); "
                              "choose another out=DIR, or delete that folder first") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return plan.target


def run(cfg: Config) -> list[Path]:
    """Export every experiment of `exp` / `exps`; all are checked before any is written."""
    if not cfg.export.dir:
        raise ExportError("export.dir is empty: name the folder to write, e.g. "
                          "python -m jaguar_reid.export exp=NAME out=DIR")
    out_root = Path(cfg.export.dir)
    plans = [plan_export(cfg, exp, out_root) for exp in experiment_names(cfg)]
    written = []
    for plan in plans:
        target = export_experiment(cfg, plan)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"wrote {target} ({len(plan.folds)} fold(s), {size / 1e6:.1f} MB); submit from it "
              f"with: python submit.py models={out_root} exp={plan.exp}")
        written.append(target)
    return written


def main(argv: list[str]) -> None:
    run(load_config(command_line(argv)))


if __name__ == "__main__":
    from jaguar_reid.cli import run_step

    run_step("export")
