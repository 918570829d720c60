"""Tuning out of fold: the greedy search keeps only steps that help; on a tiny trained
experiment the choice is saved, submit.py applies it, and ensembles of experiments agree with
the single experiment they repeat."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from jaguar_reid import layout
from jaguar_reid.config import load_config
from jaguar_reid.retrieval.postprocess import PostSettings
from jaguar_reid.retrieval.search import per_identity_subsets, search
from tests.helpers import fake_experiment, make_data


def scripted(score_of):
    """A score function from a rule on the settings (both metrics the same number)."""
    def score(s: PostSettings) -> dict:
        value = score_of(s)
        return {"map": value, "pair_auc": value, "per_fold": [{"fold": 0, "map": value,
                                                               "pair_auc": value}]}
    return score


def grid_args(*extra):
    return load_config(["tune.views=[flip,zoom1.1]", "tune.qe_k=[1,2]", "tune.qe_alpha=[0.0]",
                        "tune.dba=[false]", "tune.k1=[5,10]", "tune.k2=[2]",
                        "tune.lambda=[0.3]", "tune.blend=[0.5]", *extra])


def test_search_keeps_only_steps_that_gain():
    cfg = grid_args()

    def rule(s):
        value = 0.5
        value += 0.02 * ("zoom1.1" in s.views) - 0.01 * ("flip" in s.views)  # zoom helps
        value += 0.0005 * (s.qe_k == 2)  # below min_gain (0.001): left off
        value += 0.03 * (s.rerank and s.k1 == 10) * (1.5 if s.blend == 0.5 else 1.0)
        value += 0.01 * (s.rerank and s.rerank_norm == "rowmax")  # both norms are tried
        return value

    class Fold:  # grouped folds: no training images
        train = {}

    chosen, rows = search([Fold()], cfg, scripted(rule))
    assert chosen.views == ("orig", "zoom1.1")
    assert chosen.qe_k == 0
    assert chosen.rerank and chosen.k1 == 10 and chosen.blend == 0.5
    assert chosen.rerank_norm == "rowmax" and "re-rank rowmax" in chosen.describe()
    by_step = {r["step"]: r for r in rows}
    assert [r["step"] for r in rows] == ["raw", "tta", "qe", "rerank", "blend", "closed",
                                         "prototypes", "tuned"]
    assert by_step["raw"]["map"] == 0.5
    assert by_step["tta"]["kept"] and not by_step["qe"]["kept"]
    assert by_step["tta"]["settings"]["views"] == ["orig", "zoom1.1"]
    assert by_step["qe"]["map"] == pytest.approx(0.5205)  # measured, reported, not kept
    assert not by_step["rerank"]["kept"] and by_step["blend"]["kept"]
    assert by_step["closed"]["skipped"] and "folds.strategy=closed" in by_step["closed"]["why"]
    assert by_step["tuned"]["map"] == pytest.approx(0.52 + 0.045 + 0.01)


def test_search_leaves_everything_off_when_nothing_helps():
    cfg = grid_args()

    class Fold:
        train = {"orig": None}  # closed folds: the closed-set steps are tried
        head = None

    chosen, rows = search([Fold()], cfg, scripted(
        lambda s: 0.7 - 0.01 * (len(s.views) - 1) - 0.01 * bool(s.qe_k) - 0.01 * s.rerank
        - 0.01 * s.closed_gallery - 0.01 * (s.proto_weight > 0)))
    assert chosen == PostSettings(proto_scale=cfg.post.proto_scale)
    assert all(not r["kept"] for r in rows if r["step"] not in ("raw", "tuned"))
    assert {r["step"] for r in rows} >= {"closed", "prototypes"}


@pytest.mark.slow
def test_tune_then_submit_on_a_tiny_experiment(demo_dir, tmp_path, tiny_cfg_args, capsys):
    from jaguar_reid import submission, train
    from jaguar_reid.retrieval import search as search_module

    out = tmp_path / "out"
    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={out}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=3",
            "folds.strategy=closed", "exp=t", "submit.folds=0..1", "model.retrieval=neck"]
    cfg = load_config(args)
    train.main([*args, "fold=0..1"])
    # min_gain -1 forces every step on, so every path of submit.py runs.
    forced = ["tune.views=[flip]", "tune.qe_k=[1]", "tune.qe_alpha=[0.0]", "tune.dba=[true]",
              "tune.k1=[4]", "tune.k2=[2]", "tune.lambda=[0.3]", "tune.blend=[0.5]",
              "tune.proto_weight=[0.3]", "tune.proto_scale=[10.0]", "tune.min_gain=-1",
              "tune.local=true", "local.top_b=3", "local.max_keypoints=128"]
    search_module.main([*args, *forced])
    saved = json.loads((layout.work_dir(cfg) / layout.POST_CHOICE).read_text())
    s = saved["settings"]
    assert s["views"] == ["orig", "flip"] and s["qe_k"] == 1 and s["dba_k"] == 1
    assert s["rerank"] and s["blend"] in (0.5, 1.0) and s["closed_gallery"]
    assert s["proto_weight"] == 0.3 and s["proto_source"] in ("mean", "arcface")
    assert [r["step"] for r in saved["steps"]][-2:] == ["local", "tuned"]
    assert s["local"] and saved["fusion"]["model"]["method"] == "logistic"
    assert saved["fusion"]["local"]["top_b"] == 3
    local_cache = layout.cache_root(cfg) / "local"
    assert any(local_cache.glob("features-*/*.npz")) and any(local_cache.glob("pairs-*.npz"))
    assert layout.oof_views_path(cfg, "t", 0).is_file()
    table = capsys.readouterr().out
    assert "| raw |" in table and "| tuned |" in table

    # The saved choice is applied; post.use_tuned=false gives the plain cosine.
    submission.main([*args, "submit.score_steps=true", f"submit.file={tmp_path / 'tuned.csv'}"])
    assert "the calibration's own local.* keys are used (max_keypoints, top_b" in \
        capsys.readouterr().out
    submission.main([*args, "post.use_tuned=false", f"submit.file={tmp_path / 'raw.csv'}"])
    tuned = pd.read_csv(tmp_path / "tuned.csv")
    raw = pd.read_csv(tmp_path / "raw.csv")
    test = pd.read_csv(layout.data_files(cfg).test)
    assert tuned["row_id"].tolist() == raw["row_id"].tolist() == test["row_id"].tolist()
    scores = json.loads(layout.submission_extra(tmp_path / "tuned.csv",
                                                layout.SCORES_EXTRA).read_text())
    assert scores["post"]["t"]["source"].endswith(layout.POST_CHOICE)
    assert scores["oof_post"]["map"] == pytest.approx(saved["steps"][-1]["map"])
    # every measured step scored on the local test; the tuned one is the submission itself
    steps = scores["steps"]
    assert [r["step"] for r in steps] == [r["step"] for r in saved["steps"]]
    assert steps[-1]["test_map"] == pytest.approx(scores["test"]["map"])
    raw_scores = json.loads(layout.submission_extra(tmp_path / "raw.csv",
                                                    layout.SCORES_EXTRA).read_text())
    assert steps[0]["test_map"] == pytest.approx(raw_scores["test"]["map"])  # the raw step
    assert not np.allclose(tuned["similarity"], raw["similarity"], atol=1e-4)
    with np.load(layout.submission_extra(tmp_path / "raw.csv", layout.EMBEDDINGS_EXTRA)) as data:
        emb, names = data["embeddings"].astype(np.float64), data["filenames"].tolist()
    pos = {n: i for i, n in enumerate(names)}
    q, g = test["query_image"].map(pos), test["gallery_image"].map(pos)
    cos = np.einsum("pd,pd->p", emb[q], emb[g])
    assert np.allclose(raw["similarity"], (1 + cos) / 2, atol=2e-6)  # 7 decimals written

    # An ensemble of an experiment with its own copy is that experiment, in every mode.
    # (concat also joins the folds side by side: its reference is the one experiment's concat)
    shutil.copytree(layout.work_dir(cfg), layout.work_dir(cfg, "u"))
    submission.main([*args, "submit.ensemble=concat", "post.use_tuned=false",
                     f"submit.file={tmp_path / 'concat1.csv'}"])
    single = {"mean": raw, "similarity": raw, "concat": pd.read_csv(tmp_path / "concat1.csv")}
    for mode in ("mean", "concat", "similarity"):
        submission.main([*args, "exps=t,u", f"submit.ensemble={mode}", "submit.weights=[2,1]",
                         "post.use_tuned=false", f"submit.file={tmp_path / f'{mode}.csv'}"])
        both = pd.read_csv(tmp_path / f"{mode}.csv")
        assert np.allclose(both["similarity"], single[mode]["similarity"], atol=2e-6), mode
    with pytest.raises(Exception, match="submit.weights"):
        load_config([*args, "exps=t,u", "submit.weights=[1]"])


def test_per_identity_subsets_mimic_a_sparse_test_gallery():
    labels = np.array(list("aaaaaabbbbc"))
    subs = per_identity_subsets(labels, 2, 3, (0, 1))
    assert len(subs) == 3
    for sub in subs:
        assert np.array_equal(sub, np.unique(sub))
        assert sorted(labels[sub].tolist()) == ["a", "a", "b", "b", "c"]
    assert len({tuple(s) for s in subs}) > 1  # the draws differ
    again = per_identity_subsets(labels, 2, 3, (0, 1))
    assert all(np.array_equal(a, b) for a, b in zip(subs, again, strict=True))  # seeded
    assert np.array_equal(per_identity_subsets(labels, 0, 3, (0,))[0], np.arange(11))
    assert len(per_identity_subsets(labels, 6, 3, (0,))) == 1  # the cap changes nothing


def views_experiment(out, exp, emb, labels, kind="neck"):
    """Two finished folds whose out-of-fold view embeddings are already saved (no model)."""
    from jaguar_reid.retrieval.embedding import fold_config, views_digest

    data = out / "data"  # the images the saved views stand for (their content is digested)
    if not data.is_dir():
        make_data(data)
    cfg = load_config([f"output_dir={out}", f"exp={exp}", f"model.retrieval={kind}",
                       f"data.dir={data}"])
    fake_experiment(cfg, folds=(0, 1), weights=b"not read: the views below are up to date",
                    val=lambda fold: {"embeddings": emb[fold]["orig"], "labels": labels})
    for fold in (0, 1):
        fold_cfg, weights = fold_config(cfg, exp, fold)
        np.savez(layout.oof_views_path(cfg, exp, fold), kind=np.array(kind),
                 views=np.array(list(emb[fold])),
                 digest=np.array(views_digest(cfg, fold_cfg, weights)),
                 val_filenames=np.array([f"f{i}" for i in range(len(labels))]),
                 val_labels=labels, train_filenames=np.array([], dtype=str),
                 train_labels=np.array([], dtype=str), head_weight=np.zeros((1, 1)),
                 subcenters=np.array(1), classes=np.array([], dtype=str),
                 **{f"val.{v}": e for v, e in emb[fold].items()})


def test_tuning_an_ensemble_of_experiments(tmp_path):
    from jaguar_reid.retrieval.search import tune

    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(list("abcdef")), 3)

    def views():
        out = {}
        for v in ("orig", "flip"):
            x = rng.normal(size=(18, 8)) + 1.5 * rng.normal(size=(6, 8))[np.arange(18) // 3]
            out[v] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        return out

    a, b = [views(), views()], [views(), views()]
    views_experiment(tmp_path, "a", a, labels)
    views_experiment(tmp_path, "b", b, labels)
    grid = ["tune.views=[flip]", "tune.qe_k=[1]", "tune.qe_alpha=[0.0]", "tune.dba=[false]",
            "tune.k1=[3]", "tune.k2=[1]", "tune.lambda=[0.3]", "tune.blend=[0.5]",
            "tune.per_identity=0", f"data.dir={tmp_path / 'data'}", "device=cpu"]
    base = [f"output_dir={tmp_path}", *grid]
    ensemble = load_config([*base, "exps=a,b", "submit.weights=[3,1]"])
    both = tune(ensemble, quiet=True)
    assert (layout.work_dir(ensemble, "a+b") / layout.POST_CHOICE).is_file()
    # its raw row is the weighted mean ensemble of the two experiments' orig embeddings
    from jaguar_reid.retrieval.metrics import identity_balanced_map

    expected = []
    for fold in (0, 1):
        m = 0.75 * a[fold]["orig"] + 0.25 * b[fold]["orig"]
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        expected.append(identity_balanced_map(m @ m.T, labels))
    assert both["steps"][0]["map"] == pytest.approx(np.mean(expected), abs=1e-6)
    with pytest.raises(ValueError, match="tune each experiment on its own"):
        tune(load_config([*base, "exps=a,b", "submit.ensemble=similarity"]), quiet=True)


def test_a_gain_that_some_folds_contradict_is_noise():
    from jaguar_reid.retrieval.search import Search

    def result(*per_fold):
        return {"map": float(np.mean(per_fold)), "pair_auc": 0.5,
                "per_fold": [{"fold": i, "map": m, "pair_auc": 0.5}
                             for i, m in enumerate(per_fold)]}

    base = result(0.50, 0.40, 0.60)
    srch = Search(lambda s: base, "map", min_gain=0.001, noise=1.0)
    assert srch.gains(result(0.52, 0.42, 0.62), base)        # +0.02 in every fold
    assert not srch.gains(result(0.56, 0.44, 0.51), base)    # +0.003 on average, one fold -0.09
    assert Search(None, "map", 0.001, noise=0.0).gains(result(0.56, 0.44, 0.51), base)
    assert not srch.gains(result(0.5005, 0.4005, 0.6005), base)  # under min_gain
    assert Search(None, "map", -1.0, noise=1.0).gains(result(0.4, 0.3, 0.5), base)  # forced
