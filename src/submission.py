"""Submission: fold models -> test embeddings -> similarity of every test.csv row.

`python submit.py exp=NAME [key=value ...]` embeds the test images with each fold model of the
experiment, ensembles the L2-normalised embeddings, scores every (query, gallery) row by cosine
similarity mapped to [0, 1], checks the result against sample_submission.csv and writes it
atomically. Where `test_labels.csv` lies beside test.csv it also scores the submission with the
leaderboard metric. Nothing here touches the network.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from src.cache import prepare_images
from src.config import Config, experiment_names, load_config
from src.data import (
    DataError,
    data_files,
    pair_image_names,
    read_sample_submission,
    read_test_csv,
    read_train_csv,
)
from src.embed import combine_views, embed_views, ensemble_embeddings, fold_config
from src.io_utils import atomic_path, atomic_write_json, read_json, resolve_device, run_main
from src.leaderboard import tuned_scores
from src.metrics import identity_balanced_map, pair_roc_auc, pairs_to_matrix
from src.model import load_trained_model
from src.postprocess import (
    PostSettings,
    identity_posteriors,
    mean_prototypes,
    postprocess_pairs,
)
from src.report import after_run
from src.train import parse_fold_spec
from src.tune import POST_FILE, choice_dir, load_choice


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


def _embed_fold(cfg: Config, exp: str, fold: int | str, views: tuple[str, ...],
                with_train: bool, test_names: list[str], files: dict, device: str) -> dict:
    """One fold model's test images (and training images, `with_train`) under every view,
    kept apart, with what the prototypes need from the model."""
    fold_cfg, weights = fold_config(cfg, exp, fold)
    # Test images are prepared the way this fold's model saw its training images.
    paths, load, _ = prepare_images(fold_cfg, test_names, files["test"], "test images")
    model = load_trained_model(fold_cfg, weights)
    print(f"embedding {len(paths)} test images with {weights}, views {', '.join(views)}")
    kind = fold_cfg.model.retrieval
    test = {v: e[kind] for v, e in embed_views(model, paths, fold_cfg, device, load,
                                               views).items()}
    for emb in test.values():
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if len(bad):
            raise DataError(f"{weights}: the model's embedding of test image "
                            f"{test_names[bad[0]]!r} is not finite ({len(bad)} image(s)); the "
                            "weights are damaged or the fold diverged: train it again")
    out = {"exp": exp, "kind": kind, "test": test, "train": None,
           "head": model.head.weight.detach().float().cpu().numpy(),
           "subcenters": fold_cfg.model.subcenters}
    if with_train:
        train_df = read_train_csv(files["train"])
        paths, load, _ = prepare_images(fold_cfg, train_df["filename"], files["train"],
                                        "train images")
        print(f"embedding {len(paths)} training images (closed-set extras)")
        out["train"] = {v: e[kind] for v, e in embed_views(model, paths, fold_cfg, device,
                                                           load, views).items()}
        out["train_labels"] = train_df["ground_truth"].to_numpy().astype(str)
    return out


def _fold_material(embedded: dict, settings: PostSettings) -> dict:
    """A fold's embeddings with the settings' views combined, and its identity posteriors
    where the prototypes are blended in."""
    out = {"test": combine_views(embedded["test"], settings.views)}
    if settings.needs_training_images:
        out["train"] = combine_views(embedded["train"], settings.views)
    if settings.proto_weight > 0:
        if settings.proto_source == "arcface":
            if embedded["kind"] != "neck":
                raise ValueError(f"post.proto_source=arcface scores the neck embedding, but "
                                 f"experiment {embedded['exp']!r} submits "
                                 f"{embedded['kind']!r}; use post.proto_source=mean or "
                                 "submit.retrieval=neck")
            out["posterior"] = identity_posteriors(out["test"], embedded["head"],
                                                   settings.proto_scale, embedded["subcenters"])
        else:
            _, protos = mean_prototypes(out["train"], embedded["train_labels"])
            out["posterior"] = identity_posteriors(out["test"], protos, settings.proto_scale)
    return out


def experiment_similarity(cfg: Config, exps: list[str], weights: list[float],
                          settings: PostSettings, folds: list, test_names: list[str],
                          query: np.ndarray, gallery: np.ndarray, files: dict,
                          device: str, embedded: dict | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Post-processed similarity of every row, and the ensembled test embedding, from the
    fold models of one or several experiments combined at the embedding level. `embedded`
    ({(exp, fold): `_embed_fold`'s result} with every view the settings use) saves embedding
    again when several settings are scored."""
    fold_mode = "concat" if cfg.submit.ensemble == "concat" else "mean"
    tests, trains, posteriors = [], [], []
    for exp in exps:
        material = []
        for f in folds:
            got = (embedded or {}).get((exp, f))
            if got is None:
                got = _embed_fold(cfg, exp, f, settings.views, settings.needs_training_images,
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
                                   max_dense_bytes=int(cfg.post.max_dense_gb * 2**30),
                                   on_large=cfg.post.on_large, device=device)
    return similarity, emb


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    files = data_files(cfg)
    exps = experiment_names(cfg)
    folds = parse_fold_spec(cfg.submit.folds, cfg.folds.n_folds, key="submit.folds")
    for exp in exps:  # every model is there before anything is embedded
        for fold in folds:
            fold_config(cfg, exp, fold)
    weights = [float(w) for w in cfg.submit.weights] or [1.0] * len(exps)
    test_df = read_test_csv(files["test"])
    sample = read_sample_submission(files["sample"])
    # Before any model runs: the rows to score must be the sample's, in its order.
    validate_submission(build_submission(test_df, np.zeros(len(test_df))), sample,
                        files["sample"])
    names = pair_image_names(test_df)
    query, gallery = pair_indices(test_df, names)
    device = resolve_device(cfg.device)

    steps, embedded = None, None
    tuned = choice_dir(cfg) / POST_FILE  # the ensemble's (or the one experiment's) choice
    tuned_doc = read_json(tuned) if tuned.is_file() else None
    if cfg.submit.ensemble == "similarity" and len(exps) > 1:
        # Each experiment with its own tuned post-processing; the similarities are averaged.
        parts, embs, used = [], [], {}
        for exp in exps:
            exp_cfg = Config({**cfg, "exp": exp, "exps": ""})
            settings, source = load_choice(exp_cfg)
            print(f"{exp}: post-processing from {source}: {settings.describe()}")
            sim, emb = experiment_similarity(exp_cfg, [exp], [1.0], settings, folds, names,
                                             query, gallery, files, device)
            parts.append(sim)
            embs.append(emb)
            used[exp] = {"settings": settings.to_dict(), "source": source}
        similarity = np.average(np.stack(parts), axis=0, weights=weights)
        emb_n = ensemble_embeddings(embs, "concat", weights)
    else:
        settings, source = load_choice(cfg)
        print(f"post-processing from {source}: {settings.describe()}")
        if cfg.submit.score_steps and files["test_labels"].is_file() and tuned_doc:
            # Every step is scored on the test too: embed once, under every view any uses.
            steps = [r for r in tuned_doc["steps"] if not r.get("skipped")]
            embedded = _embed_all_steps(cfg, exps, folds, [settings, *(
                PostSettings.from_mapping(r["settings"]) for r in steps)], names, files, device)
        similarity, emb_n = experiment_similarity(cfg, exps, weights, settings, folds, names,
                                                  query, gallery, files, device, embedded)
        used = {"+".join(exps): {"settings": settings.to_dict(), "source": source}}
    sub = build_submission(test_df, similarity)
    validate_submission(sub, sample, files["sample"])

    # Everything this run makes is named after its submission file, so a second submission
    # of the same experiment (other folds, other settings) never replaces the first's extras.
    out_dir = Path(cfg.output_dir) / "+".join(exps)
    out_path = Path(cfg.submit.file) if cfg.submit.file else out_dir / "submission.csv"
    stem = out_path.with_suffix("")
    # The submission first: a run killed after it leaves the earlier embeddings beside the new
    # file at worst, never new embeddings beside a submission they did not make.
    write_submission(sub, out_path)
    with atomic_path(f"{stem}.embeddings.npz", suffix=".npz") as tmp:
        np.savez(tmp, embeddings=emb_n, filenames=np.array(names))
    print(f"wrote {out_path} ({len(sub)} rows, experiments {', '.join(exps)}, folds "
          f"{', '.join(str(f) for f in folds)})")

    result: dict = {"submission": str(out_path), "rows": len(sub), "folds": folds,
                    "experiments": exps, "post": used}
    if files["test_labels"].is_file():
        labels_df = read_train_csv(files["test_labels"])
        result["test"] = score_submission(test_df, similarity, labels_df)
        oof = out_dir / "oof_scores.json"
        result["oof"] = read_json(oof)["mean"] if oof.is_file() else None
        row = tuned_scores(tuned_doc) if tuned_doc else None
        applied = used.get("+".join(exps), {}).get("source") == str(tuned)
        if row and applied:  # the experiment's (or ensemble's) tuned choice was applied
            result["oof_post"] = {k: row[k] for k in ("map", "pair_auc")}
            if embedded is not None:
                result["steps"] = score_steps(cfg, exps, weights, steps, folds, names, test_df,
                                              labels_df, query, gallery, files, device,
                                              embedded)
        atomic_write_json(f"{stem}.scores.json", result)
        print(_cv_vs_test(result))
        if "steps" in result:
            print(_steps_table(result["steps"]))
    # An ensemble's row is named a+b; its report would have no folds of its own to show.
    after_run(Config({**cfg, "exp": "+".join(exps)}), "submit", test_scores=result.get("test"),
              wall_s=time.perf_counter() - start, device=device, report=len(exps) == 1,
              folds=folds, post="; ".join(
                  f"{name}: {PostSettings.from_mapping(u['settings']).describe()}"
                  for name, u in used.items()))
    return result


def _embed_all_steps(cfg: Config, exps: list[str], folds: list,
                     settings: list[PostSettings], names: list[str], files: dict,
                     device: str) -> dict:
    """Every fold model's embeddings under every view any of `settings` uses."""
    views = tuple(dict.fromkeys(v for s in settings for v in s.views))
    with_train = any(s.needs_training_images for s in settings)
    return {(e, f): _embed_fold(cfg, e, f, views, with_train, names, files, device)
            for e in exps for f in folds}


def score_steps(cfg: Config, exps: list[str], weights: list[float], steps: list[dict],
                folds: list, names: list[str], test_df: pd.DataFrame, labels_df: pd.DataFrame,
                query: np.ndarray, gallery: np.ndarray, files: dict, device: str,
                embedded: dict) -> list[dict]:
    """Every measured step of the tuned search applied to the local test: does what helped
    out of fold help on the test? `embedded`: `_embed_all_steps` for these steps."""
    settings = [PostSettings.from_mapping(r["settings"]) for r in steps]
    rows = []
    for row, s in zip(steps, settings, strict=True):
        sim, _ = experiment_similarity(cfg, exps, weights, s, folds, names, query, gallery,
                                       files, device, embedded)
        test = score_submission(test_df, sim, labels_df)
        rows.append({"step": row["step"], "description": row["description"],
                     "kept": row["kept"], "oof_map": row["map"], "oof_pair_auc": row["pair_auc"],
                     "test_map": test["map"], "test_pair_auc": test["pair_auc"]})
    return rows


def _steps_table(rows: list[dict]) -> str:
    lines = ["| step | settings | kept | OOF mAP | test mAP | OOF pair AUC | test pair AUC |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['description']} | {'yes' if r['kept'] else 'no'} | "
                     f"{r['oof_map']:.4f} | {r['test_map']:.4f} | {r['oof_pair_auc']:.4f} | "
                     f"{r['test_pair_auc']:.4f} |")
    return "\n".join(lines)


def _cv_vs_test(result: dict) -> str:
    test, oof = result["test"], result["oof"]
    lines = ["| | identity-balanced mAP | pair AUC |", "|---|---|---|"]
    if oof:
        lines.append(f"| out-of-fold, raw (mean over folds) | {oof['map']:.4f} | "
                     f"{oof['pair_auc']:.4f} |")
    if result.get("oof_post"):
        post = result["oof_post"]
        lines.append(f"| out-of-fold, tuned post-processing | {post['map']:.4f} | "
                     f"{post['pair_auc']:.4f} |")
    lines.append(f"| local test (test_labels.csv) | {test['map']:.4f} | {test['pair_auc']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    run(cfg)


if __name__ == "__main__":
    run_main(main)
