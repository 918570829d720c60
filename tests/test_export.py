"""`python -m jaguar_reid.export`: an exported experiment submits like the folder it came
from (byte for byte in fp32, within a measured tolerance in fp16), its manifest catches a
damaged copy before anything is written, it never replaces an earlier export, and its ONNX
models reproduce PyTorch's embeddings."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from jaguar_reid import export, layout, submission, train
from jaguar_reid.config import load_config
from jaguar_reid.identify import files as identify_files
from jaguar_reid.io_utils import read_json
from jaguar_reid.manifest import ManifestError, verify_manifest
from jaguar_reid.retrieval import search
from tests.helpers import (
    TINY_ARGS,
    base_args,
    fake_experiment,
    make_data,
    set_writable,
    snapshot,
)

pytestmark = pytest.mark.slow

EXP = "tiny"
# A search of one candidate per step, every step kept (min_gain < 0): the tuned choice is not
# the raw one, so an export that lost it would submit other numbers.
SMALL_TUNE = ["tune.views=[]", "tune.qe_k=[1]", "tune.qe_alpha=[0.0]", "tune.dba=[false]",
              "tune.k1=[5]", "tune.k2=[1]", "tune.lambda=[0.1]", "tune.blend=[0.5]",
              "tune.draws=1", "tune.min_gain=-1", "tune.noise=0"]
# fp16 weights vs fp32 on the tiny model, tuned post-processing applied: measured max
# |similarity difference| 9e-6 (similarity: cosine mapped to [0, 1]); the bound leaves room
# for other CPUs and thread counts.
HALF_SIM_TOL = 2e-3
ONNX_TOL = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny experiment, trained (2 folds), tuned and submitted once; plus an unfinished
    fold_full with a checkpoint and a stale lock in fold0, which no export may carry."""
    root = tmp_path_factory.mktemp("export")
    data = make_data(root / "data")
    args = [*TINY_ARGS, *base_args(data, root, f"exp={EXP}", "train.batch_size=4")]
    train.main([*args, "fold=0..1"])
    search.main([*args, *SMALL_TUNE])
    submission.main(args)
    cfg = load_config(args)
    source = layout.model_dir(cfg)
    fake_experiment(args, folds=(layout.FULL,), weights=None, finished=False)
    (layout.fold_dir(source, layout.FULL) / layout.CHECKPOINT).write_bytes(b"half a run")
    (layout.fold_dir(source, 0) / layout.FOLD_LOCK).write_text("")
    original = layout.work_dir(cfg) / layout.SUBMISSION
    return {"root": root, "data": data, "args": args, "source": source,
            "submission": original.read_bytes()}


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    """The fp32 export, made once; tests that damage it work on a copy."""
    out = trained["root"] / "exported"
    export.main([*trained["args"], f"out={out}"])
    return out


def _submit(trained, work: Path, models: Path, *extra: str) -> Path:
    """Submit from `models` with another work folder (another machine); its submission."""
    args = [*trained["args"], f"output_dir={work}", f"models={models}", *extra]
    submission.main(args)
    return layout.work_dir(load_config(args)) / layout.SUBMISSION


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob(layout.MODEL_WEIGHTS))


def test_export_holds_the_experiment_and_submits_the_same_bytes(trained, exported, tmp_path,
                                                                capsys):
    folder = exported / EXP
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    per_fold = {layout.RUN_CONFIG, layout.MODEL_WEIGHTS, layout.VAL_EMBEDDINGS,
                layout.TRAIN_LOG, layout.FOLD_METRICS}
    assert files == {layout.RUN_CONFIG, layout.EXP_FOLDS, layout.POST_CHOICE,
                     layout.POST_CHOICE_MD, layout.OOF_SCORES, layout.OOF_SCORES_MD,
                     layout.MANIFEST,
                     *(f"{layout.fold_name(f)}/{n}" for f in (0, 1) for n in per_fold)}
    assert not any(folder.parent.glob(".*"))  # no staging folder left behind

    set_writable(exported, False)  # as a Kaggle dataset is
    before = snapshot(exported)
    try:
        capsys.readouterr()
        sub = _submit(trained, tmp_path / "work", exported)
        assert sub.read_bytes() == trained["submission"]
        # The tuned choice came with the export (the new work folder has none).
        assert str(folder / layout.POST_CHOICE) in capsys.readouterr().out
        assert snapshot(exported) == before  # nothing changed, nothing added
    finally:
        set_writable(exported, True)
    # The experiment folder itself is read the same way as the folder holding it.
    for models in (exported, folder):
        assert layout.model_dir(load_config([*trained["args"], f"models={models}"])) == folder


def test_manifest_sizes_and_digests_agree_with_hashlib(exported, tmp_path):
    folder = exported / EXP
    doc = read_json(folder / layout.MANIFEST)
    listed = {e["path"]: e for e in doc["files"]}
    on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*")
               if p.is_file() and p.name != layout.MANIFEST}
    assert set(listed) == set(on_disk)
    for rel, path in on_disk.items():
        assert listed[rel]["size"] == len(path.read_bytes())
        assert listed[rel]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc["commit"] and doc["created"] and doc["export"]["half"] is False
    assert {"python", "torch", "timm", "numpy"} <= set(doc["versions"])
    assert verify_manifest(folder) == len(listed)
    assert verify_manifest(tmp_path) is None  # a plain folder: nothing to check


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-weights": [(f"{layout.fold_name(1)}/{layout.MODEL_WEIGHTS}", _truncate)],
    "deleted-file": [(f"{layout.fold_name(0)}/{layout.VAL_EMBEDDINGS}", Path.unlink)],
    "changed-byte": [(f"{layout.fold_name(0)}/{layout.MODEL_WEIGHTS}", _flip_byte)],
    "two-files": [(layout.POST_CHOICE, _flip_byte),
                  (f"{layout.fold_name(1)}/{layout.RUN_CONFIG}", Path.unlink)],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_export_stops_submission_naming_the_files(trained, exported, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    for rel, spoil in DAMAGE[damage]:
        spoil(copy / EXP / rel)
    work = tmp_path / "work"
    with pytest.raises(ManifestError) as caught:
        _submit(trained, work, copy)
    message = str(caught.value)
    assert str(copy / EXP) in message
    for rel, _ in DAMAGE[damage]:
        assert rel in message
    assert not (work.exists() and any(p.is_file() for p in work.rglob("*")))  # nothing


def test_export_refuses_an_existing_target_and_needs_a_finished_fold(trained, exported,
                                                                     tmp_path, capsys):
    stamp = snapshot(exported)
    with pytest.raises(export.ExportError, match=rf"{exported / EXP}.*out="):
        export.main([*trained["args"], f"out={exported}"])
    assert snapshot(exported) == stamp

    other = tmp_path / "other"
    (other / EXP).mkdir(parents=True)
    (other / EXP / "notes.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="not empty"):
        export.main([*trained["args"], f"out={other}"])
    assert [p.name for p in (other / EXP).iterdir()] == ["notes.txt"]

    args = [*TINY_ARGS, *base_args(trained["data"], tmp_path, "exp=unfinished")]
    fake_experiment(args, folds=(0,), finished=False)
    with pytest.raises(export.ExportError, match="no finished fold"):
        export.main([*args, f"out={tmp_path / 'nothing'}"])
    assert "skipping fold0, unfinished" in capsys.readouterr().out
    assert not (tmp_path / "nothing" / "unfinished").exists()


def test_unfinished_folds_and_checkpoints_stay_behind(exported):
    folder = exported / EXP
    assert not layout.fold_dir(folder, layout.FULL).exists()
    assert not list(folder.rglob(layout.CHECKPOINT)) and not list(folder.rglob(layout.FOLD_LOCK))
    assert not list(folder.rglob(layout.BEST_WEIGHTS)) and not list(folder.rglob(layout.OOF_VIEWS))


def _similarities(path: Path) -> np.ndarray:
    return pd.read_csv(path)["similarity"].to_numpy()


def test_half_export_is_half_the_bytes_and_submits_close(trained, tmp_path, capsys):
    out = tmp_path / "half"
    capsys.readouterr()
    export.main([*trained["args"], f"out={out}", "export.half=true"])
    # The experiment was never calibrated for identification: its files named in one line.
    absent = [line for line in capsys.readouterr().out.splitlines() if "not exported" in line]
    assert absent == [f"{EXP}: not made, so not exported: "
                      f"{', '.join(identify_files.EXPERIMENT_FILES)}"]
    folder = out / EXP
    ratio = _weight_bytes(folder) / _weight_bytes(trained["source"])
    assert 0.49 < ratio < 0.52, ratio
    with safe_open(str(layout.fold_dir(folder, 0) / layout.MODEL_WEIGHTS), "pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}  # noqa: SIM118
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    checks = read_json(folder / layout.MANIFEST)["checks"]
    assert min(c["half_min_cosine"] for c in checks.values()) > 0.999

    sub = _submit(trained, tmp_path / "work", folder)
    original = tmp_path / "original.csv"
    original.write_bytes(trained["submission"])
    diff = np.abs(_similarities(sub) - _similarities(original)).max()
    print(f"half export: max |similarity difference| {diff:.2e}, weights ratio {ratio:.3f}")
    assert diff < HALF_SIM_TOL


def _test_batch(fold_cfg) -> tuple[torch.Tensor, list[Path]]:
    """The test images prepared as the pipeline prepares them for this fold's model."""
    from jaguar_reid.data.augment import build_transform
    from jaguar_reid.data.csv_tables import pair_image_names, read_test_csv
    from jaguar_reid.data.image_cache import prepare_images
    from jaguar_reid.data.images import ImageDataset

    files = layout.data_files(fold_cfg)
    names = pair_image_names(read_test_csv(files.test))
    images = prepare_images(fold_cfg, names, files.test, "test images")
    dataset = ImageDataset(images.paths, None, build_transform(fold_cfg, train=False), images.load)
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), images.paths


def test_onnx_embeddings_match_pytorch(trained, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from jaguar_reid.retrieval.embedding import embed_views, fold_config
    from jaguar_reid.retrieval.onnx import onnx_embed
    from jaguar_reid.training.model import load_trained_model

    out = tmp_path / "onnx"
    export.main([*trained["args"], f"out={out}", "export.onnx=true"])
    folder = out / EXP
    listed = {e["path"] for e in read_json(folder / layout.MANIFEST)["files"]}
    cfg = load_config([*trained["args"], f"models={out}"])
    for fold in (0, 1):
        model_path = layout.fold_dir(folder, fold) / layout.ONNX_MODEL
        assert f"{layout.fold_name(fold)}/{layout.ONNX_MODEL}" in listed
        fold_cfg, weights = fold_config(cfg, EXP, fold)
        images, paths = _test_batch(fold_cfg)
        model = load_trained_model(fold_cfg, weights)
        expected = embed_views(model, paths, fold_cfg, "cpu")["orig"][fold_cfg.model.retrieval]
        got = onnx_embed(model_path, images.numpy())
        diff = float(np.abs(got - expected).max())
        print(f"fold {fold}: onnxruntime vs PyTorch max abs difference {diff:.2e}")
        assert got.shape == expected.shape and diff < ONNX_TOL
        one = onnx_embed(model_path, images[:1].numpy())  # the batch axis is dynamic
        assert np.abs(one - expected[:1]).max() < ONNX_TOL
        # The model says how to prepare its input: the fold's saved normalisation.
        props = {p.key: json.loads(p.value)
                 for p in onnx.load(str(model_path)).metadata_props}
        assert np.allclose(props["mean"], fold_cfg.data.mean)
        assert np.allclose(props["std"], fold_cfg.data.std)
        assert props["retrieval"] == fold_cfg.model.retrieval
