"""Training helpers, and the whole pipeline end to end on a tiny demo dataset."""

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from jaguar_reid import layout
from jaguar_reid.config import ConfigError, load_config, parse_fold_spec
from jaguar_reid.training.optim import cosine_with_warmup
from tests.helpers import TINY_ARGS, fold_path


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


# --------------------------------------------------------------------------- end to end
# One tiny experiment for the tests below, made once (`e2e`). Tests that run a command of their
# own write elsewhere (their own submission file, a copy of a fold, their own output folder
# reading the experiment through `models=`), so none depends on another or on their order.


def pipeline_args(demo_dir: Path, tmp: Path, output_dir: Path | None = None) -> list[str]:
    return [*TINY_ARGS, f"data.dir={demo_dir}", f"output_dir={output_dir or tmp / 'out'}",
            f"folds.file={tmp / 'folds.csv'}", "folds.n_folds=4", "exp=e2e"]


@pytest.fixture(scope="module")
def e2e(demo_dir, tmp_path_factory) -> SimpleNamespace:
    """Folds, folds 0 and 1 trained for one short epoch (fold 0 asked for again: skipped), a
    submission of folds 0..1 and one with the backbone embedding (`bb.csv`), then fold=full
    trained and submitted alone (`full.csv`): six leaderboard events, in this order."""
    from jaguar_reid import submission, train

    tmp = tmp_path_factory.mktemp("e2e")
    args = pipeline_args(demo_dir, tmp)
    cfg = load_config(args)
    exp = layout.model_dir(cfg)
    train.main([*args, "fold=0..1"])
    weights = layout.fold_dir(exp, 0) / layout.MODEL_WEIGHTS
    before = weights.stat().st_mtime_ns
    train.main([*args, "fold=0"])
    after = weights.stat().st_mtime_ns
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        submission.main([*args, "submit.folds=0..1"])
    submission.main([*args, "submit.folds=0..1", "submit.retrieval=backbone",
                     f"submit.file={tmp / 'bb.csv'}"])
    train.main([*args, "fold=full"])
    submission.main([*args, "submit.folds=full", f"submit.file={tmp / 'full.csv'}"])
    return SimpleNamespace(demo_dir=demo_dir, tmp=tmp, args=args, cfg=cfg, exp=exp,
                           skipped_stamps=(before, after), submit_out=printed.getvalue(),
                           test=pd.read_csv(layout.data_files(cfg).test))


@pytest.mark.slow
def test_trained_folds_write_their_files(e2e):
    folds = pd.read_csv(layout.folds_path(e2e.cfg))
    assert list(folds.columns) == ["filename", "ground_truth", "fold", "group"]
    for k in (0, 1):
        fold = layout.fold_dir(e2e.exp, k)
        for name in (layout.MODEL_WEIGHTS, layout.VAL_EMBEDDINGS, layout.FOLD_METRICS,
                     layout.TRAIN_LOG, layout.RUN_CONFIG):
            assert (fold / name).is_file(), name
        assert (fold / layout.BEST_WEIGHTS).is_file()
        assert not (fold / layout.CHECKPOINT).exists()
        saved = load_config([f"config={fold / layout.RUN_CONFIG}"])
        with np.load(fold / layout.VAL_EMBEDDINGS) as data:
            val = folds[folds["fold"] == k]
            assert np.array_equal(data["embeddings"], data[saved.model.retrieval])
            assert data["both"].shape[1] == data["neck"].shape[1] + data["backbone"].shape[1]
            assert data["filenames"].tolist() == val["filename"].tolist()
            assert data["labels"].tolist() == val["ground_truth"].tolist()
            assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1, atol=1e-5)
        metrics = json.loads((fold / layout.FOLD_METRICS).read_text())
        assert 0 <= metrics["pair_auc"] <= 1 and 0 <= metrics["map"] <= 1
        log = pd.read_csv(fold / layout.TRAIN_LOG)
        assert log["epoch"].tolist() == [0, 1]
        assert saved.fold == str(k)


@pytest.mark.slow
def test_out_of_fold_scores(e2e):
    oof = json.loads((e2e.exp / layout.OOF_SCORES).read_text())
    assert [row["fold"] for row in oof["folds"]] == [0, 1]
    assert oof["mean"]["map"] == pytest.approx(np.mean([r["map"] for r in oof["folds"]]))
    chosen = load_config([f"config={e2e.exp / layout.RUN_CONFIG}"]).model.retrieval
    assert oof["by_kind"][chosen]["map"] == pytest.approx(oof["mean"]["map"])
    assert set(oof["by_kind"]) == {"neck", "backbone", "both"}
    assert "untrained" in oof["by_kind"]["backbone"]
    assert "| mean |" in (e2e.exp / layout.OOF_SCORES_MD).read_text()


@pytest.mark.slow
def test_a_finished_fold_is_skipped_and_another_recipe_refused(e2e, tmp_path):
    """The second `fold=0` of the fixture did not retrain; the same experiment with another
    recipe is refused (tried on a copy of fold 0, which knows its recipe by its digest)."""
    from jaguar_reid import train

    before, after = e2e.skipped_stamps
    assert after == before
    args = pipeline_args(e2e.demo_dir, e2e.tmp, output_dir=tmp_path / "out")
    shutil.copytree(layout.fold_dir(e2e.exp, 0), fold_path(args, 0))
    with pytest.raises(ConfigError, match="different config"):
        train.main([*args, "fold=0", "train.lr=0.5"])


@pytest.mark.slow
def test_missing_folds_are_named_at_submission(e2e, tmp_path):
    from jaguar_reid import submission

    with pytest.raises(FileNotFoundError, match=layout.fold_name(2)):
        submission.main([*e2e.args, "submit.folds=all", f"submit.file={tmp_path / 'all.csv'}"])


@pytest.mark.slow
def test_trained_folds_make_a_valid_scored_submission(e2e):
    path = layout.submission_path(e2e.cfg, "e2e")
    sub = pd.read_csv(path)
    assert sub["row_id"].tolist() == e2e.test["row_id"].tolist()
    assert sub["similarity"].between(0, 1).all()
    scores = json.loads(layout.submission_extra(path, layout.SCORES_EXTRA).read_text())
    with np.load(layout.submission_extra(path, layout.EMBEDDINGS_EXTRA)) as data:
        assert len(data["filenames"]) == len(set(e2e.test["query_image"]))
    assert 0 <= scores["test"]["map"] <= 1
    assert "local test" in e2e.submit_out


@pytest.mark.slow
def test_retrieval_embedding_chosen_at_submission(e2e):
    """The retrieval embedding can be chosen again at submission time, without retraining."""
    with np.load(layout.submission_extra(e2e.tmp / "bb.csv", layout.EMBEDDINGS_EXTRA)) as data:
        assert data["embeddings"].shape[1] == 512  # resnet18's pooled features, not the neck


@pytest.mark.slow
def test_fold_full_trains_on_everything_and_submits_alone(e2e):
    full = layout.fold_dir(e2e.exp, layout.FULL)
    assert json.loads((full / layout.FOLD_METRICS).read_text())["n_val"] == 0
    assert not (full / layout.VAL_EMBEDDINGS).exists()
    sub = e2e.tmp / "full.csv"
    assert pd.read_csv(sub)["row_id"].tolist() == e2e.test["row_id"].tolist()
    assert layout.submission_extra(sub, layout.SCORES_EXTRA).is_file()


@pytest.mark.slow
def test_every_training_and_submission_left_a_leaderboard_row(e2e):
    board = pd.read_csv(layout.leaderboard_path(e2e.cfg))
    assert board["event"].tolist() == ["train", "train", "submit", "submit", "train", "submit"]
    assert board["experiment"].eq("e2e").all()
    assert board.loc[board["event"] == "submit", "post"].eq("e2e: views orig").all()
    full_scores = layout.submission_extra(e2e.tmp / "full.csv", layout.SCORES_EXTRA)
    assert board["test_map"].iloc[-1] == pytest.approx(
        json.loads(full_scores.read_text())["test"]["map"], abs=1e-4)


@pytest.mark.slow
def test_report_is_built_at_the_end_of_a_submission(e2e, tmp_path):
    """With report.enabled the experiment's report is (re)built at the end of each run; here
    into an output folder of this test's own, reading the trained experiment by `models=`."""
    from jaguar_reid import submission

    args = pipeline_args(e2e.demo_dir, e2e.tmp, output_dir=tmp_path / "out")
    submission.main([*args, f"models={e2e.exp}", "models_verify=false", "submit.folds=0..1",
                     "report.enabled=true",
                     f"submit.file={tmp_path / 'r.csv'}"])
    index = layout.report_dir(load_config(args)) / "index.html"
    assert "Worst queries" in index.read_text()


@pytest.mark.slow
def test_demo_recipe_learns_out_of_fold(tmp_path):
    """The demo's promise: a CPU minute of training lifts out-of-fold pair AUC clearly above
    the untrained model's (measured: 0.54 -> 0.67 on fold 0 of the default demo data)."""
    from jaguar_reid import train
    from jaguar_reid.data.demo import generate_demo_dataset

    generate_demo_dataset(tmp_path / "demo", seed=0)
    args = ["config=configs/demo.yaml", f"data.dir={tmp_path / 'demo'}",
            f"output_dir={tmp_path / 'out'}", f"folds.file={tmp_path / 'folds.csv'}", "fold=0",
            "device=cpu",
            # The floor and the report have tests of their own; here they would only add time.
            "floor.enabled=false", "report.enabled=false"]
    train.main(args)
    metrics = json.loads((fold_path(args) / layout.FOLD_METRICS).read_text())
    assert metrics["pair_auc"] > metrics["untrained"]["pair_auc"] + 0.08
    assert metrics["map"] > metrics["untrained"]["map"] + 0.08


def test_optimizer_groups_lr_and_weight_decay(tiny_cfg_args):
    from jaguar_reid.training.model import build_model
    from jaguar_reid.training.optim import build_optimizer

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
    warm-up, P x K sampler, augmentation, dropout and mixup RNG, cross-batch memory, log) comes
    back from the checkpoint: the resumed fold ends with the very weights, embeddings and log
    of an uninterrupted one."""
    from jaguar_reid import train

    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "fold=0",
            "train.epochs=3", "train.batch_size=8", "train.sampler=pk", "train.pk_k=2",
            "train.ema=true", "train.freeze_epochs=1", "train.bg_blank_prob=0.3",
            "model.neck_dropout=0.2", "train.layer_decay=0.8", "model.attention=glam",
            "loss.multi_similarity=0.5", "loss.xbm_size=24", "loss.recall_k=0.5",
            "train.metrix_alpha=2"]
    train.main([*args, "exp=straight"])

    def stop_after_two(fold, epoch):
        if epoch == 2:
            raise Interrupted
    with pytest.raises(Interrupted):
        train.run(load_config([*args, "exp=resumed"]), after_epoch=stop_after_two)
    fold = fold_path([*args, "exp=resumed"])
    assert (fold / layout.CHECKPOINT).is_file() and not (fold / layout.FOLD_METRICS).exists()
    assert pd.read_csv(fold / layout.TRAIN_LOG)["epoch"].tolist() == [0, 1, 2]
    monkeypatch.undo()
    train.main([*args, "exp=resumed"])

    straight = fold_path([*args, "exp=straight"])
    assert not (fold / layout.CHECKPOINT).exists()
    _same_weights(straight / layout.MODEL_WEIGHTS, fold / layout.MODEL_WEIGHTS)
    with np.load(straight / layout.VAL_EMBEDDINGS) as a, \
            np.load(fold / layout.VAL_EMBEDDINGS) as b:
        for key in ("embeddings", "neck", "backbone", "both"):
            assert np.array_equal(a[key], b[key]), key
    log_a, log_b = pd.read_csv(straight / layout.TRAIN_LOG), pd.read_csv(fold / layout.TRAIN_LOG)
    columns = ["epoch", "loss", "lr", "pair_auc", "map", "map_backbone"]
    pd.testing.assert_frame_equal(log_a[columns], log_b[columns])
    # The frozen first epoch really froze the backbone: its lr was 0 and only the head moved.
    assert log_a["epoch"].tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_loader_workers_do_not_change_training(demo_dir, tmp_path, tiny_cfg_args):
    """Augmentation draws come from the sampler's seeds, not from worker processes' RNG."""
    from jaguar_reid import train

    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "fold=0",
            "train.bg_blank_prob=0.5"]
    train.main([*args, "exp=w0"])
    train.main([*args, "exp=w2", "data.num_workers=2"])
    _same_weights(fold_path([*args, "exp=w0"]) / layout.MODEL_WEIGHTS,
                  fold_path([*args, "exp=w2"]) / layout.MODEL_WEIGHTS)


def test_best_weights_early_stopping_and_compile(demo_dir, tmp_path, tiny_cfg_args, monkeypatch):
    """Scripted validation scores: the best epoch's weights are kept, training stops after
    `early_stop` epochs without gain, and `train.compile` wraps the training step."""
    import torch

    from jaguar_reid import train

    scripted = iter([0.3, 0.5, 0.7, 0.6, 0.65, 0.0])
    real_evaluate = train.validation_scores

    def evaluate(*a, **k):
        embs, scores = real_evaluate(*a, **k)
        value = next(scripted)
        return embs, {**scores, "map": value}
    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(type(module).__name__)
        return module
    monkeypatch.setattr(train, "validation_scores", evaluate)
    monkeypatch.setattr(torch, "compile", fake_compile)
    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "fold=0", "exp=es",
            "train.epochs=6", "train.early_stop=2", "train.select=best", "train.compile=true"]
    train.main(args)
    fold = fold_path(args)
    log = pd.read_csv(fold / layout.TRAIN_LOG)
    assert log["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert log["map"].tolist() == [0.3, 0.5, 0.7, 0.6, 0.65]
    metrics = json.loads((fold / layout.FOLD_METRICS).read_text())
    assert metrics["best_epoch"] == 2 and metrics["epochs_run"] == 4
    assert metrics["weights"] == "best (epoch 2)"
    assert (fold / layout.MODEL_WEIGHTS).read_bytes() == (fold / layout.BEST_WEIGHTS).read_bytes()
    assert compiled == ["TrainStep"]


@pytest.mark.slow
def test_data_parallel_on_cpu_matches_one_process(demo_dir, tmp_path, tiny_cfg_args):
    """gpus=2 (torchrun, gloo, two processes, batch 8 each) takes the same optimiser steps as
    one process with batch 8 and two accumulation steps: bit for bit the same trained
    parameters. (Batch-norm running statistics are rank 0's alone, so buffers differ.)"""
    from jaguar_reid import train

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
    one_dir, ddp_dir = fold_path([*args, "exp=one"]), fold_path([*args, "exp=ddp"])
    one = _weights(one_dir / layout.MODEL_WEIGHTS)
    ddp = _weights(ddp_dir / layout.MODEL_WEIGHTS)
    params = [k for k in one if not k.endswith(("running_mean", "running_var",
                                                 "num_batches_tracked"))]
    for key in params:
        assert torch.equal(one[key], ddp[key]), key
    # Training moved the weights, so agreeing is not agreeing on the initialisation.
    start = json.loads((one_dir / layout.FOLD_METRICS).read_text())
    assert start["epochs_run"] == 2
    metrics = json.loads((ddp_dir / layout.FOLD_METRICS).read_text())
    assert metrics["processes"] == 2
    assert not list(ddp_dir.glob("*.tmp*"))


@pytest.mark.slow
def test_folds_side_by_side(demo_dir, tmp_path, tiny_cfg_args):
    """parallel=folds: two folds in two processes at once, the report after both; the same
    folds run one after the other are recognised as finished (same recipe)."""
    from jaguar_reid import train

    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "exp=pf", "fold=0..1"]
    train.main([*args, "gpus=2", "parallel=folds"])
    cfg = load_config(args)
    exp = layout.model_dir(cfg)
    for k in (0, 1):
        assert layout.is_finished(layout.fold_dir(exp, k))
        log = layout.fold_logs_dir(cfg) / f"{layout.fold_name(k)}.out"
        assert "epoch 1" in log.read_text()
    oof = json.loads((exp / layout.OOF_SCORES).read_text())
    assert [r["fold"] for r in oof["folds"]] == [0, 1]
    weights = layout.fold_dir(exp, 0) / layout.MODEL_WEIGHTS
    stamp = weights.stat().st_mtime_ns
    train.main(args)
    assert weights.stat().st_mtime_ns == stamp
