"""Submission: fold models -> test embeddings -> similarity of every test.csv row.

`python submit.py exp=NAME [key=value ...]` embeds the test images with each fold model of the
experiment, ensembles the L2-normalised embeddings, scores every (query, gallery) row by cosine
similarity mapped to [0, 1], checks the result against sample_submission.csv and writes it
atomically. Where `test_labels.csv` lies beside test.csv it also scores the submission with the
leaderboard metric. Nothing here touches the network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from jaguar_reid import layout
from jaguar_reid.commit import REMOVE, commit_together, finish_commits
from jaguar_reid.config import (
    METRICS,
    Config,
    experiment_names,
    load_config,
    parse_fold_spec,
)
from jaguar_reid.data.csv_tables import (
    DataError,
    pair_image_names,
    read_sample_submission,
    read_test_csv,
    read_train_csv,
    resolve_image_paths,
)
from jaguar_reid.io_utils import atomic_path, json_text, read_json, resolve_device
from jaguar_reid.keys import choices
from jaguar_reid.manifest import verify_manifest
from jaguar_reid.reporting.page import after_run
from jaguar_reid.reporting.runs import tuned_scores
from jaguar_reid.retrieval.embedding import (
    FoldEmbeddings,
    combine_views,
    embed_fold,
    ensemble_embeddings,
    fold_config,
)
from jaguar_reid.retrieval.floor import FLOOR_NAME, FloorEmbedder, below_floor
from jaguar_reid.retrieval.fusion import FusionModel
from jaguar_reid.retrieval.metrics import identity_balanced_map, pair_roc_auc, pairs_to_matrix
from jaguar_reid.retrieval.postprocess import (
    PostSettings,
    cosine_to_unit,
    identity_posteriors,
    mean_prototypes,
    pair_cosine,
    postprocess_pairs,
)
from jaguar_reid.retrieval.rerank import dense_limit_bytes
from jaguar_reid.retrieval.search import load_choice, load_fusion
from jaguar_reid.retrieval.verify import fused_similarity, verify_shortlist
from jaguar_reid.text import markdown_table


def pair_indices(test_df: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    position = {name: i for i, name in enumerate(names)}
    query = test_df["query_image"].map(position)
    gallery = test_df["gallery_image"].map(position)
    for column, idx in (("query_image", query), ("gallery_image", gallery)):
        if idx.isna().any():
            row = idx.index[idx.isna()][0]
            raise DataError(f"test.csv: row {row + 2}: {column} {test_df.at[row, column]!r} "
                            "is not among the embedded images")
    return query.to_numpy(np.int64), gallery.to_numpy(np.int64)


def build_submission(test_df: pd.DataFrame, similarity: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"row_id": test_df["row_id"].to_numpy(), "similarity": similarity})


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame, sample_path: str | Path) -> None:
    """Same row_ids in the same order as the sample, every similarity finite and in [0, 1]."""
    if len(sub) != len(sample):
        raise DataError(f"submission has {len(sub)} rows but {sample_path} has {len(sample)}")
    ids, expected = sub["row_id"].to_numpy(), sample["row_id"].to_numpy()
    mismatch = np.flatnonzero(ids != expected)
    if len(mismatch):
        i = mismatch[0]
        raise DataError(f"submission row {i}: row_id {ids[i]} but {sample_path} has "
                        f"{expected[i]} there (row_ids must match in order)")
    values = sub["similarity"].to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1))
    if len(bad):
        i = bad[0]
        raise DataError(f"submission row {i} (row_id {ids[i]}): similarity {values[i]} is not a "
                        f"finite number in [0, 1] ({len(bad)} such rows)")


def write_submission(sub: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    if path.exists():
        print(f"replacing {path}")
    with atomic_path(path, suffix=".csv") as tmp:
        sub.to_csv(tmp, index=False, float_format="%.7f")


def score_submission(test_df: pd.DataFrame, similarity: np.ndarray,
                     labels_df: pd.DataFrame) -> dict[str, float]:
    """The leaderboard metric on a submission, from the rows as written (local test labels)."""
    names = pair_image_names(test_df)
    label_of = dict(zip(labels_df["filename"], labels_df["ground_truth"], strict=True))
    missing = [n for n in names if n not in label_of]
    if missing:
        raise DataError(f"test_labels.csv: no label for {len(missing)} test image(s), "
                        f"e.g. {missing[:3]}")
    query, gallery = pair_indices(test_df, names)
    sim = pairs_to_matrix(query, gallery, similarity, len(names))
    labels = np.array([label_of[n] for n in names])
    return {"map": identity_balanced_map(sim, labels), "pair_auc": pair_roc_auc(sim, labels)}


# Fold models' embeddings by (experiment, fold), made once and scored under several settings.
EmbeddedFolds = dict[tuple[str, int | str], FoldEmbeddings]


def _fold_material(embedded: FoldEmbeddings, settings: PostSettings) -> dict:
    """A fold's embeddings with the settings' views combined, and its identity posteriors
    where the prototypes are blended in."""
    out = {"test": combine_views(embedded.test, settings.views)}
    if settings.needs_training_images:
        out["train"] = combine_views(embedded.train, settings.views)
    if settings.proto_weight > 0:
        if settings.proto_source == "arcface":
            if embedded.kind != "neck":
                raise ValueError(f"post.proto_source=arcface scores the neck embedding, but "
                                 f"experiment {embedded.exp!r} submits "
                                 f"{embedded.kind!r}; use post.proto_source=mean or "
                                 "submit.retrieval=neck")
            out["posterior"] = identity_posteriors(out["test"], embedded.head,
                                                   settings.proto_scale, embedded.subcenters)
        else:
            _, protos = mean_prototypes(out["train"], embedded.train_labels)
            out["posterior"] = identity_posteriors(out["test"], protos, settings.proto_scale)
    return out


def experiment_similarity(cfg: Config, exps: list[str], weights: list[float],
                          settings: PostSettings, folds: list, test_names: list[str],
                          query: np.ndarray, gallery: np.ndarray, files: layout.DataFiles,
                          device: str, embedded: EmbeddedFolds | None = None,
                          fusion: tuple[FusionModel, dict] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Post-processed similarity of every row, and the ensembled test embedding, from the
    fold models of one or several experiments combined at the embedding level. `embedded`
    ({(exp, fold): `embed_fold`'s result} with every view the settings use) saves embedding
    again when several settings are scored. `fusion`: the tuned calibration and the local.*
    keys it was fitted with (`load_fusion`), needed when the settings verify locally."""
    fold_mode = "concat" if cfg.submit.ensemble == "concat" else "mean"
    tests, trains, posteriors = [], [], []
    for exp in exps:
        material = []
        for f in folds:
            got = (embedded or {}).get((exp, f))
            if got is None:
                got = embed_fold(cfg, exp, f, settings.views, settings.needs_training_images,
                                  test_names, files, device)
            material.append(_fold_material(got, settings))
        tests.append(ensemble_embeddings([m["test"] for m in material], fold_mode))
        if settings.needs_training_images:
            trains.append(ensemble_embeddings([m["train"] for m in material], fold_mode))
        posteriors += [m["posterior"] for m in material if "posterior" in m]
    emb = ensemble_embeddings(tests, fold_mode, weights) if len(tests) > 1 else tests[0]
    train_emb = None
    if trains:
        train_emb = ensemble_embeddings(trains, fold_mode, weights) if len(trains) > 1 \
            else trains[0]
    similarity = postprocess_pairs(emb, query, gallery, settings, train_emb=train_emb,
                                   posteriors=posteriors or None,
                                   max_dense_bytes=dense_limit_bytes(cfg),
                                   on_large=cfg.post.on_large, device=device,
                                   knn_backend=cfg.post.knn_backend)
    if settings.local:
        similarity = local_verification(cfg, test_names, query, gallery, similarity, files,
                                        fusion, device)
    return similarity, emb


def local_verification(cfg: Config, names: list[str], query: np.ndarray, gallery: np.ndarray,
                       similarity: np.ndarray, files: layout.DataFiles,
                       fusion: tuple[FusionModel, dict] | None,
                       device: str = "cpu") -> np.ndarray:
    """The rows' similarities fused with the inlier counts of each test image's top pairs,
    counted with the local.* keys the calibration was fitted with."""
    if fusion is None:
        raise ValueError("post.local=true needs the calibration python -m jaguar_reid.tune "
                         "fits out of fold (tune.local=true); run it, or set post.local=false")
    model, saved = fusion
    if saved != dict(cfg.local):
        changed = sorted(k for k in set(saved) | set(cfg.local)
                         if saved.get(k) != cfg.local.get(k))
        print(f"local verification: the calibration's own local.* keys are used "
              f"({', '.join(changed)} differ from this config's)")
        cfg = Config({**cfg, "local": Config(saved)})
    n = len(names)
    matrix = np.zeros((n, n))
    matrix[query, gallery] = similarity
    paths = resolve_image_paths(Path(cfg.data.dir), names, files.test)
    print(f"local verification: {n} test images, top {cfg.local.top_b} each")
    inliers, verified = verify_shortlist(cfg, paths, matrix, device)
    return fused_similarity(model, similarity, inliers[query, gallery],
                            verified[query, gallery])


ENSEMBLES = choices("submit.ensemble")


@dataclass
class Request:
    """What one submission scores: the experiments and folds, the test rows, the device."""

    cfg: Config
    exps: list[str]
    weights: list[float]
    folds: list
    files: layout.DataFiles
    test_df: pd.DataFrame
    sample: pd.DataFrame
    names: list[str]
    query: np.ndarray
    gallery: np.ndarray
    device: str

    @property
    def name(self) -> str:
        """The experiment, or `a+b` for an ensemble: the work folder's name."""
        return "+".join(self.exps)


def prepare_request(cfg: Config) -> Request:
    """Every model and input checked before anything is embedded: an exported experiment's
    files are the ones its manifest lists, each fold model is there, and the rows to score
    are the sample submission's, in its order."""
    files = layout.data_files(cfg)
    exps = experiment_names(cfg)
    folds = parse_fold_spec(cfg.submit.folds, cfg.folds.n_folds, key="submit.folds")
    for exp in exps:  # an exported experiment is checked against its manifest first
        verify_manifest(layout.model_dir(cfg, exp), required=bool(cfg.models)
                        and cfg.models_verify)
    for exp in exps:
        for fold in folds:
            fold_config(cfg, exp, fold)
    test_df = read_test_csv(files.test)
    sample = read_sample_submission(files.sample)
    validate_submission(build_submission(test_df, np.zeros(len(test_df))), sample,
                        files.sample)
    names = pair_image_names(test_df)
    query, gallery = pair_indices(test_df, names)
    return Request(cfg, exps, [float(w) for w in cfg.submit.weights] or [1.0] * len(exps),
                   folds, files, test_df, sample, names, query, gallery,
                   resolve_device(cfg.device))


def similarity_ensemble(req: Request) -> tuple[np.ndarray, np.ndarray, dict]:
    """Each experiment with its own tuned post-processing; the similarities averaged."""
    parts, embs, used = [], [], {}
    for exp in req.exps:
        exp_cfg = Config({**req.cfg, "exp": exp, "exps": ""})
        settings, source = load_choice(exp_cfg)
        print(f"{exp}: post-processing from {source}: {settings.describe()}")
        fusion = load_fusion(source) if settings.local else None
        sim, emb = experiment_similarity(exp_cfg, [exp], [1.0], settings, req.folds, req.names,
                                         req.query, req.gallery, req.files, req.device,
                                         fusion=fusion)
        parts.append(sim)
        embs.append(emb)
        used[exp] = {"settings": settings.to_dict(), "source": source}
    similarity = np.average(np.stack(parts), axis=0, weights=req.weights)
    return similarity, ensemble_embeddings(embs, "concat", req.weights), used


def embedding_ensemble(req: Request, tuned_doc: dict | None
                       ) -> tuple[np.ndarray, np.ndarray, dict, list | None,
                              EmbeddedFolds | None]:
    """The experiments' embeddings ensembled, then one post-processing (the tuned choice);
    with `submit.score_steps`, every view any tuned step uses is embedded once."""
    settings, source = load_choice(req.cfg)
    print(f"post-processing from {source}: {settings.describe()}")
    fusion = load_fusion(source) if settings.local else None
    steps, embedded = None, None
    if req.cfg.submit.score_steps and req.files.test_labels.is_file() and tuned_doc:
        steps = [r for r in tuned_doc["steps"] if not r.get("skipped")]
        every = [settings, *(PostSettings.from_mapping(r["settings"]) for r in steps)]
        embedded = _embed_all_steps(req.cfg, req.exps, req.folds, every, req.names,
                                    req.files, req.device)
    similarity, emb = experiment_similarity(req.cfg, req.exps, req.weights, settings,
                                            req.folds, req.names, req.query, req.gallery,
                                            req.files, req.device, embedded, fusion)
    used = {req.name: {"settings": settings.to_dict(), "source": source}}
    return similarity, emb, used, steps, embedded


def commit_outputs(req: Request, sub: pd.DataFrame, emb: np.ndarray, result: dict) -> Path:
    """The submission, its embeddings and its local scores (or the removal of an earlier
    run's, when this run has none) put in place together, after everything was computed and
    checked: a failure or a kill at any point leaves the earlier run's files all as they were,
    or all of this run's (`commit`)."""
    out_path = layout.submission_path(req.cfg, req.name)
    if out_path.exists():
        print(f"replacing {out_path}")
    scores = layout.submission_extra(out_path, layout.SCORES_EXTRA)
    writers = {
        out_path: lambda tmp: sub.to_csv(tmp, index=False, float_format="%.7f"),
        layout.submission_extra(out_path, layout.EMBEDDINGS_EXTRA): lambda tmp: _save_npz(
            tmp, embeddings=emb, filenames=np.array(req.names)),
        scores: (lambda tmp: tmp.write_text(json_text(result))) if "test" in result else REMOVE,
    }
    commit_together(writers, out_path.name)
    print(f"wrote {out_path} ({len(sub)} rows, experiments {', '.join(req.exps)}, folds "
          f"{', '.join(str(f) for f in req.folds)})")
    return out_path


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file object: numpy adds no .npz to the name
        np.savez(handle, **arrays)


def local_scores(req: Request, result: dict, similarity: np.ndarray, tuned: Path,
                 tuned_doc: dict | None, steps: list | None,
                 embedded: EmbeddedFolds | None) -> None:
    """With `test_labels.csv`: the submission's leaderboard metric beside the out-of-fold
    figures (and each tuned step's, with `submit.score_steps`), into `result`."""
    labels_df = read_train_csv(req.files.test_labels)
    result["test"] = score_submission(req.test_df, similarity, labels_df)
    oof = layout.read_path(req.cfg, layout.OOF_SCORES, req.name)
    oof_doc = read_json(oof) if oof.is_file() else {}
    result["oof"] = oof_doc.get("mean")
    result["oof_floor"] = oof_doc.get("floor_mean")
    result["floor"] = test_floor(req, labels_df)
    row = tuned_scores(tuned_doc) if tuned_doc else None
    applied = result["post"].get(req.name, {}).get("source") == str(tuned)
    if row and applied:  # the experiment's (or ensemble's) tuned choice was applied
        result["oof_post"] = {k: row[k] for k in METRICS}
        if embedded is not None:
            result["steps"] = score_steps(req, steps, labels_df, embedded,
                                          tuned_doc.get("fusion"))


def test_floor(req: Request, labels_df: pd.DataFrame) -> dict | None:
    """The plain frozen floor on the local test: the first experiment's backbone and starting
    weights, untouched (`floor.enabled`); None when off or when those weights are not here."""
    if not req.cfg.floor.enabled:
        return None
    model_cfg, _ = fold_config(req.cfg, req.exps[0], req.folds[0])
    cfg = Config({**req.cfg, "model": model_cfg.model, "seed": model_cfg.seed})
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        print(f"plain floor skipped: its weights {cfg.model.weights} are not on this machine")
        return None
    emb = FloorEmbedder(cfg, req.device).embed(req.names, req.files.test)
    similarity = cosine_to_unit(pair_cosine(emb, req.query, req.gallery))
    return score_submission(req.test_df, similarity, labels_df)


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    submission = layout.submission_path(cfg, "+".join(experiment_names(cfg)))
    if finish_commits(submission.parent, submission.name):  # a run killed while committing
        print(f"completed the outputs of an interrupted submission beside {submission}")
    req = prepare_request(cfg)
    tuned = layout.read_path(cfg, layout.POST_CHOICE, req.name)  # the ensemble's choice
    tuned_doc = read_json(tuned) if tuned.is_file() else None
    steps, embedded = None, None
    if cfg.submit.ensemble == "similarity" and len(req.exps) > 1:
        similarity, emb, used = similarity_ensemble(req)
    else:
        similarity, emb, used, steps, embedded = embedding_ensemble(req, tuned_doc)
    sub = build_submission(req.test_df, similarity)
    validate_submission(sub, req.sample, req.files.sample)
    out_path = layout.submission_path(cfg, req.name)
    result: dict = {"submission": str(out_path), "rows": len(sub), "folds": req.folds,
                    "experiments": req.exps, "post": used}
    if req.files.test_labels.is_file():
        local_scores(req, result, similarity, tuned, tuned_doc, steps, embedded)
    commit_outputs(req, sub, emb, result)
    if "test" in result:
        print(_cv_vs_test(result))
    if "steps" in result:
        print(_steps_table(result["steps"]))
    # An ensemble's row is named a+b; its report would have no folds of its own to show.
    test = {**result["test"], "floor": result.get("floor")} if "test" in result else None
    after_run(Config({**cfg, "exp": req.name}), "submit", test_scores=test,
              wall_s=time.perf_counter() - start, device=req.device,
              report=len(req.exps) == 1, folds=req.folds, post="; ".join(
                  f"{name}: {PostSettings.from_mapping(u['settings']).describe()}"
                  for name, u in used.items()))
    line = below_floor(f"submission {req.name!r} on the local test:", result.get("test"),
                       result.get("floor"))
    if line:  # the last line a user sees
        print(line)
    return result


def _embed_all_steps(cfg: Config, exps: list[str], folds: list,
                     settings: list[PostSettings], names: list[str], files: layout.DataFiles,
                     device: str) -> EmbeddedFolds:
    """Every fold model's embeddings under every view any of `settings` uses."""
    views = tuple(dict.fromkeys(v for s in settings for v in s.views))
    with_train = any(s.needs_training_images for s in settings)
    return {(e, f): embed_fold(cfg, e, f, views, with_train, names, files, device)
            for e in exps for f in folds}


def score_steps(req: Request, steps: list[dict], labels_df: pd.DataFrame,
                embedded: EmbeddedFolds, fusion: dict | None = None) -> list[dict]:
    """Every measured step of the tuned search applied to the local test: does what helped
    out of fold help on the test? `embedded`: `_embed_all_steps` for these steps; `fusion`:
    the tuned calibration of the local step, if it was tried."""
    rows = []
    model = (FusionModel.from_dict(fusion["model"]), dict(fusion["local"])) if fusion else None
    for row in steps:
        s = PostSettings.from_mapping(row["settings"])
        sim, _ = experiment_similarity(req.cfg, req.exps, req.weights, s, req.folds, req.names,
                                       req.query, req.gallery, req.files, req.device, embedded,
                                       model)
        test = score_submission(req.test_df, sim, labels_df)
        rows.append({"step": row["step"], "description": row["description"],
                     "kept": row["kept"], "oof_map": row["map"], "oof_pair_auc": row["pair_auc"],
                     "test_map": test["map"], "test_pair_auc": test["pair_auc"]})
    return rows


def _steps_table(rows: list[dict]) -> str:
    header = ["step", "settings", "kept", "OOF mAP", "test mAP", "OOF pair AUC",
              "test pair AUC"]
    return markdown_table(header, [
        [r["step"], r["description"], "yes" if r["kept"] else "no", f"{r['oof_map']:.4f}",
         f"{r['test_map']:.4f}", f"{r['oof_pair_auc']:.4f}", f"{r['test_pair_auc']:.4f}"]
        for r in rows])


def _cv_vs_test(result: dict) -> str:
    test, oof = result["test"], result["oof"]
    rows = []
    if oof:
        rows.append(["out-of-fold, raw (mean over folds)", f"{oof['map']:.4f}",
                     f"{oof['pair_auc']:.4f}"])
    if result.get("oof_post"):
        post = result["oof_post"]
        rows.append(["out-of-fold, tuned post-processing", f"{post['map']:.4f}",
                     f"{post['pair_auc']:.4f}"])
    if result.get("oof_floor"):
        floor = result["oof_floor"]
        rows.append([f"{FLOOR_NAME}, out of fold", f"{floor['map']:.4f}",
                     f"{floor['pair_auc']:.4f}"])
    rows.append(["local test (test_labels.csv)", f"{test['map']:.4f}", f"{test['pair_auc']:.4f}"])
    if result.get("floor"):
        floor = result["floor"]
        rows.append([f"{FLOOR_NAME}, local test", f"{floor['map']:.4f}",
                     f"{floor['pair_auc']:.4f}"])
    return markdown_table(["", "identity-balanced mAP", "pair AUC"], rows)


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    run(cfg)


if __name__ == "__main__":
    from jaguar_reid.cli import run_step

    run_step("submit")
