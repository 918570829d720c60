"""Training helpers, and the whole pipeline end to end on a tiny demo dataset."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from src.config import ConfigError, load_config
from src.train import cosine_with_warmup, parse_fold_spec


@pytest.mark.parametrize("spec, expected", [
    ("0", [0]), ("0..4", [0, 1, 2, 3, 4]), ("1..2", [1, 2]), ("0,3", [0, 3]),
    ("full", ["full"]), ("all", [0, 1, 2, 3, 4]), ("0..1,full", [0, 1, "full"]),
    ("2,2", [2]),
])
def test_fold_spec(spec, expected):
    assert parse_fold_spec(spec, 5) == expected


@pytest.mark.parametrize("spec", ["5", "-1", "0..5", "3..1", "x", "", "0..", "fold0"])
def test_bad_fold_spec_names_the_key(spec):
    with pytest.raises(ConfigError, match="'fold'"):
        parse_fold_spec(spec, 5)


def test_cosine_with_warmup_shape():
    factors = [cosine_with_warmup(s, total_steps=100, warmup_steps=10) for s in range(101)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5)
    assert factors[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))


@pytest.mark.slow
def test_pipeline_end_to_end(demo_dir, tmp_path, tiny_cfg_args, capsys):
    """Folds, two folds of one short epoch, out-of-fold scores, submission checked and scored."""
    from src import submission, train

    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "exp=e2e"]
    train.main([*args, "fold=0..1"])
    exp = tmp_path / "out" / "e2e"

    folds = pd.read_csv(tmp_path / "folds.csv")
    assert list(folds.columns) == ["filename", "ground_truth", "fold", "group"]
    for k in (0, 1):
        fold = exp / f"fold{k}"
        for name in ("model.safetensors", "val_embeddings.npz", "metrics.json", "log.csv",
                     "config.yaml"):
            assert (fold / name).is_file(), name
        assert (fold / "best.safetensors").is_file() and not (fold / "checkpoint.pt").exists()
        with np.load(fold / "val_embeddings.npz") as data:
            val = folds[folds["fold"] == k]
            chosen = load_config([f"config={fold / 'config.yaml'}"]).model.retrieval
            assert np.array_equal(data["embeddings"], data[chosen])
            assert data["both"].shape[1] == data["neck"].shape[1] + data["backbone"].shape[1]
            assert data["filenames"].tolist() == val["filename"].tolist()
            assert data["labels"].tolist() == val["ground_truth"].tolist()
            assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1, atol=1e-5)
        metrics = json.loads((fold / "metrics.json").read_text())
        assert 0 <= metrics["pair_auc"] <= 1 and 0 <= metrics["map"] <= 1
        log = pd.read_csv(fold / "log.csv")
        assert log["epoch"].tolist() == [0, 1]
        assert load_config([f"config={fold / 'config.yaml'}"]).fold == str(k)

    oof = json.loads((exp / "oof_scores.json").read_text())
    assert [row["fold"] for row in oof["folds"]] == [0, 1]
    assert oof["mean"]["map"] == pytest.approx(np.mean([r["map"] for r in oof["folds"]]))
    chosen = load_config([f"config={exp / 'config.yaml'}"]).model.retrieval
    assert oof["by_kind"][chosen]["map"] == pytest.approx(oof["mean"]["map"])
    assert set(oof["by_kind"]) == {"neck", "backbone", "both"}
    assert "untrained" in oof["by_kind"]["backbone"]
    assert "| mean |" in (exp / "oof_scores.md").read_text()

    # A finished fold is skipped, not retrained; the same exp with another recipe is refused.
    stamp = (exp / "fold0" / "model.safetensors").stat().st_mtime_ns
    train.main([*args, "fold=0"])
    assert (exp / "fold0" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="different config"):
        train.main([*args, "fold=0", "train.lr=0.5"])

    # Missing folds at submission time are named; the trained ones make a valid submission.
    with pytest.raises(FileNotFoundError, match="fold2"):
        submission.main([*args, "submit.folds=all"])
    capsys.readouterr()
    submission.main([*args, "submit.folds=0..1"])
    out = capsys.readouterr().out
    sub = pd.read_csv(exp / "submission.csv")
    test = pd.read_csv(demo_dir / "test.csv")
    assert sub["row_id"].tolist() == test["row_id"].tolist()
    assert sub["similarity"].between(0, 1).all()
    scores = json.loads((exp / "submission.scores.json").read_text())
    with np.load(exp / "submission.embeddings.npz") as data:
        assert len(data["filenames"]) == len(set(test["query_image"]))
    assert 0 <= scores["test"]["map"] <= 1
    assert "local test" in out

    # The retrieval embedding can be chosen again at submission time, without retraining.
    submission.main([*args, "submit.folds=0..1", "submit.retrieval=backbone",
                     f"submit.file={tmp_path / 'bb.csv'}"])
    with np.load(tmp_path / "bb.embeddings.npz") as data:
        assert data["embeddings"].shape[1] == 512  # resnet18's pooled features, not the neck

    # fold=full: every image, no validation; it alone makes a submission too.
    train.main([*args, "fold=full"])
    full = exp / "fold_full"
    assert json.loads((full / "metrics.json").read_text())["n_val"] == 0
    assert not (full / "val_embeddings.npz").exists()
    submission.main([*args, "submit.folds=full", f"submit.file={tmp_path / 'full.csv'}"])
    assert pd.read_csv(tmp_path / "full.csv")["row_id"].tolist() == test["row_id"].tolist()
    assert (tmp_path / "full.scores.json").is_file()

    # Every finished training and submission left a leaderboard row; with report.enabled the
    # experiment's report is (re)built at the end of each.
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert board["event"].tolist() == ["train", "train", "submit", "submit", "train", "submit"]
    assert board["experiment"].eq("e2e").all()
    assert board.loc[board["event"] == "submit", "post"].eq("e2e: views orig").all()
    assert board["test_map"].iloc[-1] == pytest.approx(
        json.loads((tmp_path / "full.scores.json").read_text())["test"]["map"], abs=1e-4)
    submission.main([*args, "submit.folds=0..1", "report.enabled=true",
                     f"submit.file={tmp_path / 'r.csv'}"])
    assert "Worst queries" in (exp / "report" / "index.html").read_text()


@pytest.mark.slow
def test_demo_recipe_learns_out_of_fold(tmp_path):
    """The demo's promise: a CPU minute of training lifts out-of-fold pair AUC clearly above
    the untrained model's (measured: 0.54 -> 0.67 on fold 0 of the default demo data)."""
    from src import train
    from src.demo_data import generate_demo_dataset

    generate_demo_dataset(tmp_path / "demo", seed=0)
    train.main(["config=configs/demo.yaml", f"data.dir={tmp_path / 'demo'}",
                f"output_dir={tmp_path / 'out'}", f"folds.file={tmp_path / 'folds.csv'}",
                "fold=0", "device=cpu"])
    metrics = json.loads((tmp_path / "out" / "demo" / "fold0" / "metrics.json").read_text())
    assert metrics["pair_auc"] > metrics["untrained"]["pair_auc"] + 0.08
    assert metrics["map"] > metrics["untrained"]["map"] + 0.08


def test_optimizer_groups_lr_and_weight_decay(tiny_cfg_args):
    from src.model import build_model
    from src.train import build_optimizer

    cfg = load_config([*tiny_cfg_args, "train.lr=1e-4", "train.head_lr=1e-2",
                       "train.weight_decay=0.05"])
    model = build_model(cfg, n_classes=3)
    optimizer = build_optimizer(model, cfg)
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups
               for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(setting) == len(names)  # every parameter exactly once
    for name, param in names.items():
        lr, decay = setting[id(param)]
        assert lr == (1e-4 if name.startswith("backbone.") else 1e-2), name
        assert decay == (0.05 if param.ndim > 1 else 0.0), name
    assert setting[id(model.pool.p)][1] == 0.0 and setting[id(model.head.weight)][1] == 0.05


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(demo_dir, tmp_path, tiny_cfg_args, monkeypatch):
    """Every piece of state a resume needs (weights, AdamW moments, schedule, EMA, frozen
    warm-up, P x K sampler, augmentation and dropout RNG, log) comes back from the checkpoint:
    the resumed fold ends with the very weights, embeddings and log of an uninterrupted one."""
    from src import train

    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "fold=0",
            "train.epochs=3", "train.batch_size=8", "train.sampler=pk", "train.pk_k=2",
            "train.ema=true", "train.freeze_epochs=1", "train.bg_blank_prob=0.3",
            "model.neck_dropout=0.2", "train.layer_decay=0.8"]
    train.main([*args, "exp=straight"])

    def stop_after_two(fold, epoch):
        if epoch == 2:
            raise Interrupted
    monkeypatch.setattr(train, "_epoch_done", stop_after_two)
    with pytest.raises(Interrupted):
        train.main([*args, "exp=resumed"])
    fold = tmp_path / "out" / "resumed" / "fold0"
    assert (fold / "checkpoint.pt").is_file() and not (fold / "metrics.json").exists()
    assert pd.read_csv(fold / "log.csv")["epoch"].tolist() == [0, 1, 2]
    monkeypatch.undo()
    train.main([*args, "exp=resumed"])

    straight = tmp_path / "out" / "straight" / "fold0"
    assert not (fold / "checkpoint.pt").exists()
    _same_weights(straight / "model.safetensors", fold / "model.safetensors")
    with np.load(straight / "val_embeddings.npz") as a, np.load(fold / "val_embeddings.npz") as b:
        for key in ("embeddings", "neck", "backbone", "both"):
            assert np.array_equal(a[key], b[key]), key
    log_a, log_b = pd.read_csv(straight / "log.csv"), pd.read_csv(fold / "log.csv")
    columns = ["epoch", "loss", "lr", "pair_auc", "map", "map_backbone"]
    pd.testing.assert_frame_equal(log_a[columns], log_b[columns])
    # The frozen first epoch really froze the backbone: its lr was 0 and only the head moved.
    assert log_a["epoch"].tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_loader_workers_do_not_change_training(demo_dir, tmp_path, tiny_cfg_args):
    """Augmentation draws come from the sampler's seeds, not from worker processes' RNG."""
    from src import train

    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "fold=0",
            "train.bg_blank_prob=0.5"]
    train.main([*args, "exp=w0"])
    train.main([*args, "exp=w2", "data.num_workers=2"])
    out = tmp_path / "out"
    _same_weights(out / "w0" / "fold0" / "model.safetensors",
                  out / "w2" / "fold0" / "model.safetensors")


def test_best_weights_early_stopping_and_compile(demo_dir, tmp_path, tiny_cfg_args, monkeypatch):
    """Scripted validation scores: the best epoch's weights are kept, training stops after
    `early_stop` epochs without gain, and `train.compile` wraps the training step."""
    import torch

    from src import train

    scripted = iter([0.3, 0.5, 0.7, 0.6, 0.65, 0.0])
    real_evaluate = train._evaluate

    def evaluate(*a, **k):
        embs, scores = real_evaluate(*a, **k)
        value = next(scripted)
        return embs, {**scores, "map": value}
    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(type(module).__name__)
        return module
    monkeypatch.setattr(train, "_evaluate", evaluate)
    monkeypatch.setattr(torch, "compile", fake_compile)
    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "fold=0", "exp=es",
            "train.epochs=6", "train.early_stop=2", "train.select=best", "train.compile=true"]
    train.main(args)
    fold = tmp_path / "out" / "es" / "fold0"
    log = pd.read_csv(fold / "log.csv")
    assert log["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert log["map"].tolist() == [0.3, 0.5, 0.7, 0.6, 0.65]
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["epochs_run"] == 4
    assert metrics["weights"] == "best (epoch 2)"
    assert (fold / "model.safetensors").read_bytes() == (fold / "best.safetensors").read_bytes()
    assert compiled == ["TrainStep"]


@pytest.mark.slow
def test_data_parallel_on_cpu_matches_one_process(demo_dir, tmp_path, tiny_cfg_args):
    """gpus=2 (torchrun, gloo, two processes, batch 8 each) takes the same optimiser steps as
    one process with batch 8 and two accumulation steps: bit for bit the same trained
    parameters. (Batch-norm running statistics are rank 0's alone, so buffers differ.)"""
    from src import train

    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "fold=0",
            "train.epochs=2", "train.batch_size=8"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun runs each rank on one thread: the same summation order
    try:
        train.main([*args, "exp=one", "train.grad_accum=2"])
    finally:
        torch.set_num_threads(threads)
    train.main([*args, "exp=ddp", "gpus=2"])
    out = tmp_path / "out"
    one, ddp = _weights(out / "one/fold0/model.safetensors"), _weights(
        out / "ddp/fold0/model.safetensors")
    params = [k for k in one if not k.endswith(("running_mean", "running_var",
                                                 "num_batches_tracked"))]
    for key in params:
        assert torch.equal(one[key], ddp[key]), key
    # Training moved the weights, so agreeing is not agreeing on the initialisation.
    start = json.loads((out / "one/fold0/metrics.json").read_text())
    assert start["epochs_run"] == 2
    metrics = json.loads((out / "ddp/fold0/metrics.json").read_text())
    assert metrics["processes"] == 2
    assert not list((out / "ddp/fold0").glob("*.tmp*"))


@pytest.mark.slow
def test_folds_side_by_side(demo_dir, tmp_path, tiny_cfg_args):
    """parallel=folds: two folds in two processes at once, the report after both; the same
    folds run one after the other are recognised as finished (same recipe)."""
    from src import train

    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "exp=pf", "fold=0..1"]
    train.main([*args, "gpus=2", "parallel=folds"])
    exp = tmp_path / "out" / "pf"
    for k in (0, 1):
        assert (exp / f"fold{k}" / "metrics.json").is_file()
        assert "epoch 1" in (exp / "logs" / f"fold{k}.out").read_text()
    assert [r["fold"] for r in json.loads((exp / "oof_scores.json").read_text())["folds"]] == [0, 1]
    stamp = (exp / "fold0" / "model.safetensors").stat().st_mtime_ns
    train.main(args)
    assert (exp / "fold0" / "model.safetensors").stat().st_mtime_ns == stamp
