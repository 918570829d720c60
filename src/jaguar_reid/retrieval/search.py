"""Choose the post-processing out of fold:
`python -m jaguar_reid.tune exp=NAME [exps=a,b] [key=value]`.

Each fold's validation images are embedded by that fold's model under every candidate view
(`python -m jaguar_reid.embed`, done here when missing); pairs are formed inside one fold, as
for the
out-of-fold scores. A greedy search then takes the steps in order — test-time views, query
expansion, re-ranking, its blend with the raw similarity, the closed-set extras, and (with
`tune.local`) local-feature verification of each query's top pairs, fused with the similarity
by a calibration that scores each fold with a fit on the other folds' pairs — and keeps a
step only when it raises `tune.metric` (mean over folds) by more than `tune.min_gain` and by
more than `tune.noise` standard errors of its per-fold gains (a gain some folds contradict is
noise: small folds move by more than the steps' effects). It prints
raw vs each step vs the chosen combination and saves the choice in `<exp>/postprocess.json`,
which `submit.py` then uses (unless `post.use_tuned=false`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from jaguar_reid import layout
from jaguar_reid.config import Config, experiment_names, load_config
from jaguar_reid.data.csv_tables import (
    pair_image_names,
    read_test_csv,
    read_train_csv,
    resolve_image_paths,
)
from jaguar_reid.io_utils import (
    atomic_write_json,
    atomic_write_text,
    read_json,
    resolve_device,
)
from jaguar_reid.progress import bar as progress_bar
from jaguar_reid.retrieval.embedding import (
    OofViews,
    combine_views,
    ensemble_embeddings,
    ensure_oof_views,
    require_finished_folds,
)
from jaguar_reid.retrieval.fusion import FusionModel, cross_fitted, fit_fusion
from jaguar_reid.retrieval.metrics import identity_balanced_map, pair_roc_auc
from jaguar_reid.retrieval.postprocess import (
    PostSettings,
    all_pairs,
    identity_posteriors,
    mean_prototypes,
    postprocess_pairs,
)
from jaguar_reid.retrieval.rerank import dense_limit_bytes
from jaguar_reid.retrieval.verify import check_learned, check_local, verify_shortlist
from jaguar_reid.text import markdown_table


@dataclass
class TuningFold:
    """One fold's out-of-fold material for the search, every view kept apart."""

    fold: int
    labels: np.ndarray
    val: dict[str, np.ndarray]
    train: dict[str, np.ndarray]   # empty unless the folds are closed
    train_labels: np.ndarray
    head: tuple[np.ndarray, int, np.ndarray] | None  # ArcFace weight, subcenters, classes
    subsets: list[np.ndarray] = dataclasses.field(default_factory=list)  # scored image sets
    filenames: np.ndarray | None = None  # the validation images' CSV names (local step)


def per_identity_subsets(labels: np.ndarray, cap: int, draws: int,
                         seed: tuple[int, ...]) -> list[np.ndarray]:
    """`draws` seeded subsets of the images (sorted indices) with at most `cap` of each
    identity; cap 0: the one set of every image."""
    if cap <= 0 or np.unique(labels, return_counts=True)[1].max() <= cap:
        return [np.arange(len(labels))]
    out = []
    for d in range(draws):
        rng = np.random.default_rng([*seed, d])
        keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
        out.append(np.sort(np.concatenate(keep)))
    return out


def test_density(cfg: Config) -> tuple[int, str]:
    """The per-identity cap `tune.per_identity` asks for, and how it was found. -1: the test's
    images per training identity (every test identity has training images), at least 2."""

    cap = cfg.tune.per_identity
    if cap >= 0:
        return cap, "tune.per_identity" if cap else "every validation image"
    files = layout.data_files(cfg)
    if not files.test.is_file() or not files.train.is_file():
        return 0, f"every validation image ({files.test} not found)"
    n_test = len(pair_image_names(read_test_csv(files.test)))
    n_ids = read_train_csv(files.train)["ground_truth"].nunique()
    cap = max(2, round(n_test / max(1, n_ids)))
    return cap, (f"the test's density: {n_test} test images / {n_ids} training identities "
                 f"= {n_test / max(1, n_ids):.1f}")


def choice_name(cfg: Config) -> str:
    """Whose choice it is: the experiment, or `a+b` for an ensemble of several."""
    return "+".join(experiment_names(cfg))


def load_folds(cfg: Config, device: str, cap: int = 0) -> list[TuningFold]:
    """Every experiment's fold material, combined per view the way submit.py combines them;
    each fold scored on subsets of at most `cap` images per identity (0: all)."""
    exps = experiment_names(cfg)
    if len(exps) > 1 and cfg.submit.ensemble == "similarity":
        raise ValueError("submit.ensemble=similarity averages each experiment's own tuned "
                         "similarity: tune each experiment on its own (python -m jaguar_reid.tune "
                         "exp=NAME), or use submit.ensemble=mean|concat to tune the ensemble")
    per_exp = {exp: set(require_finished_folds(cfg, exp)) for exp in exps}
    folds = sorted(set.intersection(*per_exp.values()))
    if not folds:
        raise FileNotFoundError(f"experiments {', '.join(exps)} share no finished fold")
    views = list(dict.fromkeys(["orig", *cfg.embed.tta, *cfg.tune.views]))

    def combine(parts: list[np.ndarray]) -> np.ndarray:
        if len(parts) == 1:
            return parts[0]
        return ensemble_embeddings(parts, cfg.submit.ensemble, cfg.submit.weights)

    out = []
    for fold in folds:
        saved: list[OofViews] = [ensure_oof_views(cfg, exp, fold, views, device)
                                 for exp in exps]
        first = saved[0]
        for exp, other in zip(exps[1:], saved[1:], strict=True):
            if not np.array_equal(other.val_filenames, first.val_filenames):
                raise ValueError(f"fold {fold}: experiment {exp!r} validated on other images "
                                 f"than {exps[0]!r}; an ensemble needs the same folds file")
        val = {v: combine([s.val[v] for s in saved]) for v in views}
        train = {v: combine([s.train[v] for s in saved]) for v in views
                 if all(v in s.train for s in saved)}
        head = None
        if len(exps) == 1 and first.kind == "neck" and len(first.classes):
            head = (first.head_weight, first.subcenters, first.classes)
        out.append(TuningFold(fold, first.val_labels, val, train, first.train_labels, head,
                              filenames=first.val_filenames))
    for fd in out:
        fd.subsets = per_identity_subsets(fd.labels, cap, cfg.tune.draws, (cfg.seed, fd.fold))
    return out


def fold_similarity(fd: TuningFold, s: PostSettings, cfg: Config, device: str,
                    subset: np.ndarray | None = None) -> np.ndarray:
    """(N, N) post-processed similarity of one fold's validation images (those of `subset`:
    the gallery is then that subset, as a test gallery would be)."""
    emb = combine_views(fd.val, s.views)
    if subset is not None:
        emb = emb[subset]
    train_emb = combine_views(fd.train, s.views) if s.needs_training_images else None
    posteriors = None
    if s.proto_weight > 0:
        if s.proto_source == "arcface":
            weight, subcenters, _ = fd.head
            posteriors = [identity_posteriors(emb, weight, s.proto_scale, subcenters)]
        else:
            _, protos = mean_prototypes(train_emb, fd.train_labels)
            posteriors = [identity_posteriors(emb, protos, s.proto_scale)]
    n = len(emb)
    rows, cols = all_pairs(n)
    sim = postprocess_pairs(emb, rows, cols, s, train_emb=train_emb, posteriors=posteriors,
                            max_dense_bytes=dense_limit_bytes(cfg),
                            on_large=cfg.post.on_large, device=device,
                            knn_backend=cfg.post.knn_backend)
    return sim.reshape(n, n)


def _summary(per_fold: list[dict]) -> dict:
    return {"map": float(np.mean([r["map"] for r in per_fold])),
            "pair_auc": float(np.mean([r["pair_auc"] for r in per_fold])),
            "per_fold": per_fold}


@dataclass
class LocalPairs:
    """Every scored (fold, subset)'s pairs with their inlier counts, for the local step."""

    blocks: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    # (fold, draw, similarity (n, n), inliers, verified, labels (n,))

    def flat(self) -> tuple[np.ndarray, ...]:
        """(fold, similarity, inliers, verified, same identity) of every off-diagonal pair."""
        parts = []
        for fold, _, sim, inl, ver, labels in self.blocks:
            off = ~np.eye(len(labels), dtype=bool)
            same = labels[:, None] == labels[None, :]
            parts.append((np.full(off.sum(), fold), sim[off], inl[off], ver[off], same[off]))
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def local_pairs(folds: list[TuningFold], s: PostSettings, cfg: Config, device: str) -> LocalPairs:
    """Inlier counts of each scored subset's shortlist under the settings `s` (local off)."""
    root, train_csv = Path(cfg.data.dir), layout.data_files(cfg).train
    blocks = []
    for fd in folds:
        paths = resolve_image_paths(root, [str(f) for f in fd.filenames], train_csv)
        for draw, subset in enumerate(fd.subsets):
            sim = fold_similarity(fd, s, cfg, device, subset)
            inl, ver = verify_shortlist(cfg, [paths[i] for i in subset], sim, device)
            blocks.append((fd.fold, draw, sim, inl, ver, fd.labels[subset]))
    return LocalPairs(blocks)


def score_local(pairs: LocalPairs, cfg: Config) -> dict:
    """Scores of the fused similarity, each fold's pairs fused by a calibration fitted on the
    other folds' pairs only (cross-fitting: a fold never scores its own fit)."""
    groups, sim, inl, ver, same = pairs.flat()
    fused = cross_fitted(groups, sim, inl, ver, same, cfg.local.fusion)
    per_fold: dict[int, list[tuple[float, float]]] = {}
    start = 0
    for fold, _, _, _, _, labels in pairs.blocks:
        n = len(labels)
        off = ~np.eye(n, dtype=bool)
        scored = np.ones((n, n))
        scored[off] = fused[start:start + off.sum()]
        start += off.sum()
        per_fold.setdefault(fold, []).append((identity_balanced_map(scored, labels),
                                              pair_roc_auc(scored, labels)))
    return _summary([{"fold": f, "map": float(np.mean([m for m, _ in v])),
                      "pair_auc": float(np.mean([a for _, a in v]))}
                     for f, v in per_fold.items()])


def score_settings(folds: list[TuningFold], s: PostSettings, cfg: Config, device: str) -> dict:
    """Scores of the settings `s` (local off): each fold's mean over its scored subsets."""
    per_fold = []
    for fd in folds:
        scores = []
        for subset in fd.subsets:
            sim = fold_similarity(fd, s, cfg, device, subset)
            labels = fd.labels[subset]
            scores.append((identity_balanced_map(sim, labels), pair_roc_auc(sim, labels)))
        per_fold.append({"fold": fd.fold, "map": float(np.mean([m for m, _ in scores])),
                         "pair_auc": float(np.mean([a for _, a in scores]))})
    return _summary(per_fold)


def paired_gain(diff: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of paired gains (one per fold, or per fold and seed); the
    standard error of a single gain is 0."""
    diff = np.asarray(diff, dtype=np.float64)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


def clears_noise(diff: np.ndarray, min_gain: float, noise: float) -> bool:
    """The rule a change must pass to count as a gain: its paired gains average more than
    `min_gain`, and more than `noise` standard errors of themselves (a gain some folds
    contradict is noise); a negative `min_gain` accepts every change. The tuner keeps a step by
    it and the sweep gives its verdicts by it."""
    mean, se = paired_gain(diff)
    return mean > min_gain and (min_gain < 0 or mean > noise * se)


class Search:
    """Greedy, step by step: each step's best candidate is kept when it beats the current
    choice by more than `min_gain` on `metric`."""

    def __init__(self, score: Callable[[PostSettings], dict], metric: str,
                 min_gain: float, noise: float = 0.0) -> None:
        self.score_fn, self.metric, self.min_gain, self.noise = score, metric, min_gain, noise
        self.cache: dict[PostSettings, dict] = {}
        self.rows: list[dict] = []

    def score(self, s: PostSettings) -> dict:
        if s not in self.cache:
            self.cache[s] = self.score_fn(s)
        return self.cache[s]

    def best(self, candidates: Iterable[PostSettings]) -> tuple[PostSettings, dict] | None:
        found = None
        for s in progress_bar(candidates, desc="tuning", unit="setting"):
            result = self.score(s)
            if found is None or result[self.metric] > found[1][self.metric]:
                found = (s, result)
        return found

    def step(self, name: str, current: PostSettings,
             candidates: Iterable[PostSettings]) -> PostSettings:
        """Record the step's best candidate; return it when kept, else `current`."""
        found = self.best(candidates)
        if found is None:
            self.rows.append({"step": name, "skipped": True})
            return current
        s, result = found
        kept = self.gains(result, self.score(current))
        self.record(name, s, result, kept)
        return s if kept else current

    def gains(self, result: dict, base: dict) -> bool:
        """Does `result` beat `base` under the noise rule (`clears_noise`) on its per-fold
        gains?"""
        diff = np.array([r[self.metric] - b[self.metric]
                         for r, b in zip(result["per_fold"], base["per_fold"], strict=True)])
        return clears_noise(diff, self.min_gain, self.noise)

    def record(self, name: str, s: PostSettings, result: dict, kept: bool) -> None:
        self.rows.append({"step": name, "settings": s.to_dict(), "description": s.describe(),
                          "map": result["map"], "pair_auc": result["pair_auc"], "kept": kept,
                          "per_fold": result["per_fold"]})


def search(folds: list[TuningFold], cfg: Config, score: Callable[[PostSettings], dict]
           ) -> tuple[PostSettings, list[dict]]:
    """The tuned settings and one row per step (see the module's docstring)."""
    t = cfg.tune
    srch = Search(score, t.metric, t.min_gain, t.noise)
    current = PostSettings(proto_scale=cfg.post.proto_scale)
    srch.record("raw", current, srch.score(current), True)
    current = _tta_step(srch, current, t)
    current = srch.step("qe", current, (
        replace(current, qe_k=k, qe_alpha=a, dba_k=k if dba else 0)
        for dba in t.dba for k in t.qe_k for a in t.qe_alpha if k > 0))
    current = _rerank_step(srch, current, t)
    if all(fd.train for fd in folds):
        current = _closed_steps(srch, current, t, all(fd.head is not None for fd in folds))
    else:  # closed-set extras are only measurable where validation identities have training
        for name in ("closed", "prototypes"):
            srch.rows.append({"step": name, "skipped": True,
                              "why": "grouped folds: validation identities have no training "
                                     "images; measure with folds.strategy=closed"})
    if t.local and len(folds) > 1:
        current = srch.step("local", current, [replace(current, local=True)])
    elif t.local:
        srch.rows.append({"step": "local", "skipped": True,
                          "why": "one fold: the calibration is fitted on the other folds"})
    srch.record("tuned", current, srch.score(current), True)
    return current, srch.rows


def _tta_step(srch: Search, current: PostSettings, t: Config) -> PostSettings:
    """Test-time views: add the best remaining view while it helps."""
    candidates = [v for v in t.views if v != "orig"]
    best_tta = None
    while candidates:
        trials = [replace(current, views=(*current.views, v)) for v in candidates]
        found = srch.best(trials)
        best_tta = found if best_tta is None or found[1][t.metric] > best_tta[1][t.metric] \
            else best_tta
        if not srch.gains(found[1], srch.score(current)):
            break
        current = found[0]
        candidates.remove(current.views[-1])
    if best_tta is None:
        srch.rows.append({"step": "tta", "skipped": True})
    elif len(current.views) > 1:  # the views kept (a further view gained too little)
        srch.record("tta", current, srch.score(current), kept=True)
    else:
        srch.record("tta", *best_tta, kept=False)
    return current


def _rerank_step(srch: Search, before: PostSettings, t: Config) -> PostSettings:
    """Re-ranking alone (blend 1), then its blend with the raw similarity; the better of
    the two is kept when it beats no re-ranking."""
    current = before
    reranks = [replace(before, rerank=True, k1=k1, k2=k2, lambda_value=lam, blend=1.0,
                       rerank_norm=norm)
               for norm in t.rerank_norm for k1 in t.k1 for k2 in t.k2 for lam in t["lambda"]]
    rr, rr_result = srch.best(reranks)
    blended = srch.best(replace(rr, blend=w) for w in t.blend)
    winner = max([(rr, rr_result), *([blended] if blended else [])],
                 key=lambda pair: pair[1][t.metric])
    if srch.gains(winner[1], srch.score(before)):
        current = winner[0]
    srch.record("rerank", rr, rr_result, kept=current == rr)
    if blended:
        srch.record("blend", *blended, kept=current == blended[0])
    return current


def _closed_steps(srch: Search, current: PostSettings, t: Config,
                  with_heads: bool) -> PostSettings:
    """The training images in the gallery (with QE or re-ranking tuned again over it), then
    the identity prototypes (ArcFace ones only where every fold has its head)."""
    gallery = [replace(current, closed_gallery=True)]
    gallery += [replace(current, closed_gallery=True, qe_k=k, qe_alpha=a, dba_k=k if dba else 0)
                for dba in t.dba for k in t.qe_k for a in t.qe_alpha if k > 0]
    w = current.blend if current.rerank else 1.0
    norms = [current.rerank_norm] if current.rerank else t.rerank_norm
    gallery += [replace(current, closed_gallery=True, rerank=True, k1=k1, k2=k2,
                        lambda_value=lam, blend=w, rerank_norm=norm)
                for norm in norms for k1 in t.k1 for k2 in t.k2 for lam in t["lambda"]]
    current = srch.step("closed", current, gallery)
    sources = ["mean", "arcface"] if with_heads else ["mean"]
    return srch.step("prototypes", current, (
        replace(current, proto_weight=pw, proto_scale=sc, proto_source=src)
        for src in sources for pw in t.proto_weight for sc in t.proto_scale))


def format_steps(rows: list[dict]) -> str:
    cells = []
    for row in rows:
        if row.get("skipped"):
            why = f": {row['why']}" if "why" in row else ""
            cells.append([row["step"], f"skipped{why}", "", "", ""])
            continue
        cells.append([row["step"], row["description"], f"{row['map']:.4f}",
                      f"{row['pair_auc']:.4f}", "yes" if row["kept"] else "no"])
    return markdown_table(["step", "settings", "mAP", "pair AUC", "kept"], cells)


def tune(cfg: Config, quiet: bool = False) -> dict:
    device = resolve_device(cfg.device)
    if cfg.tune.local:  # a missing library or weights file refused before the search
        check_learned(cfg)
    start = time.perf_counter()
    cap, why = test_density(cfg)
    folds = load_folds(cfg, device, cap)
    evaluations = 0

    pairs: dict[PostSettings, LocalPairs] = {}  # the local step's, kept for the final fit

    def score(s: PostSettings) -> dict:
        nonlocal evaluations
        evaluations += 1
        if not s.local:
            return score_settings(folds, s, cfg, device)
        base = replace(s, local=False)
        if base not in pairs:
            pairs[base] = local_pairs(folds, base, cfg, device)
        return score_local(pairs[base], cfg)

    sizes = [len(fd.subsets[0]) for fd in folds]
    scored_on = (f"at most {cap} images per identity ({why}), {cfg.tune.draws} draw(s) per "
                 f"fold" if cap else why) + f"; {', '.join(map(str, sizes))} images per fold"
    if not quiet:
        print(f"scoring on {scored_on}")
    chosen, rows = search(folds, cfg, score)
    out_dir = layout.work_dir(cfg, choice_name(cfg))
    result = {"experiments": experiment_names(cfg), "metric": cfg.tune.metric,
              "min_gain": cfg.tune.min_gain, "noise": cfg.tune.noise,
              "folds": [fd.fold for fd in folds],
              "ensemble": cfg.submit.ensemble, "weights": list(cfg.submit.weights),
              "scored_on": scored_on,
              "settings": chosen.to_dict(), "description": chosen.describe(), "steps": rows,
              "fusion": _final_fusion(pairs, chosen, cfg),
              "evaluations": evaluations, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out_dir / layout.POST_CHOICE, result)
    table = format_steps(rows)
    atomic_write_text(out_dir / layout.POST_CHOICE_MD,
                      f"# Post-processing chosen out of fold: {out_dir.name}\n\nMetric: "
                      f"{cfg.tune.metric}, mean over folds {result['folds']}, scored on "
                      f"{scored_on}; a step is kept "
                      f"when it gains more than {cfg.tune.min_gain} and more than "
                      f"{cfg.tune.noise} standard error(s) of its per-fold gains.\n\n"
                      f"{table}\n")
    if not quiet:
        print(f"post-processing out of fold ({out_dir}, {evaluations} settings tried in "
              f"{result['seconds']} s):\n{table}\nchosen: {chosen.describe()}")
    return result


def _final_fusion(pairs: dict, chosen: PostSettings, cfg: Config) -> dict | None:
    """The calibration of the local step, fitted on every fold's pairs: what submit.py applies
    when the step was kept (and what `submit.score_steps` scores when it was not); None when
    the step was not tried."""
    if not pairs:
        return None
    base = replace(chosen, local=False)
    _, sim, inl, ver, same = (pairs.get(base) or list(pairs.values())[-1]).flat()
    # The local.* keys travel with the calibration: it is only valid for counts made so.
    return {"model": fit_fusion(sim, inl, ver, same, cfg.local.fusion).to_dict(),
            "local": dict(cfg.local)}


def load_fusion(source: str) -> tuple[FusionModel, dict]:
    """The calibration saved with a tuned choice that verifies locally, and the `local.*` keys
    its inlier counts were made with (`source`: where the choice came from, `load_choice`'s
    second value)."""
    if not Path(source).is_file():
        raise ValueError("post.local=true needs the calibration python -m jaguar_reid.tune fits "
                         "out of fold (tune.local=true); run it, or set post.local=false")
    doc = read_json(source)
    if not doc.get("fusion"):
        raise ValueError(f"{source}: the choice has local verification but no calibration "
                         "('fusion'); run python -m jaguar_reid.tune again")
    try:
        model, keys = FusionModel.from_dict(doc["fusion"]["model"]), dict(doc["fusion"]["local"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{source}: 'fusion' is not a calibration saved by python -m "
                         f"jaguar_reid.tune ({exc}); run it again") from None
    check_local(keys)  # the keys verification will run with, before anything is embedded
    return model, keys


def load_choice(cfg: Config) -> tuple[PostSettings, str]:
    """The post-processing submit.py applies, and where it came from: the saved choice of
    `python -m jaguar_reid.tune` unless `post.use_tuned=false` or none was saved, else `post.*`."""
    path = layout.read_path(cfg, layout.POST_CHOICE, choice_name(cfg))
    if cfg.post.use_tuned and path.is_file():
        saved = read_json(path)
        try:
            return PostSettings.from_mapping(saved["settings"], source=str(path)), str(path)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a choice saved by python -m jaguar_reid.tune ({exc}); "
                             "run it again or set post.use_tuned=false") from None
    return PostSettings.from_config(cfg.post, cfg.embed.tta), "config (post.*, embed.tta)"


def main(argv: list[str]) -> None:
    tune(load_config(argv))
