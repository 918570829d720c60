"""The table of a sweep (`jaguar_reid.sweep`): its runs grouped into configurations, each
paired against the baseline fold by fold and seed by seed under the tuner's noise rule, and
written with its JSON and plot together into `<output_dir>/sweeps/<name>/`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaguar_reid.commit import commit_together, finish_commits
from jaguar_reid.io_utils import json_text
from jaguar_reid.retrieval.search import clears_noise, paired_gain
from jaguar_reid.sweeping.plan import (
    FLOOR,
    ZERO,
    Plan,
    RunResult,
    baseline_row,
    run_name,
    sweep_dir,
)
from jaguar_reid.text import markdown_table

TABLE, DATA, PLOT = "sweep.md", "sweep.json", "sweep.png"

# --------------------------------------------------------------------------- the table

@dataclass
class Arm:
    """One configuration: its runs' values by (fold, seed)."""

    name: str
    values: dict[tuple[int, str], float]
    tuned: dict[tuple[int, str], float]
    test: list[float]
    test_floor: list[float]
    wall_s: float
    runs: int

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values())))

    @property
    def se(self) -> float:
        v = np.array(list(self.values.values()))
        return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")

    def fold_means(self, folds: list[int]) -> list[float]:
        return [float(np.mean([v for (f, _), v in self.values.items() if f == fold]))
                for fold in folds]


def arms_of(results: list[RunResult]) -> list[Arm]:
    arms: dict[str, Arm] = {}
    for r in results:
        arm = arms.setdefault(r.arm, Arm(r.arm, {}, {}, [], [], 0.0, 0))
        arm.values.update({(f, r.seed): v for f, v in r.oof.items()})
        arm.tuned.update({(f, r.seed): v for f, v in r.tuned.items()})
        if r.test_map is not None:
            arm.test.append(float(r.test_map))
        if r.test_floor_map is not None:
            arm.test_floor.append(float(r.test_floor_map))
        arm.wall_s += r.wall_s
        arm.runs += 1
    return list(arms.values())


def floor_arm(name: str, results: list[RunResult]) -> Arm | None:
    """The plain frozen floor as a row, read beside each zero-training run's folds (with
    pretrained weights the same for every seed; a random initialisation is the seed's)."""
    zero = [r for r in results if r.arm == run_name(name, [ZERO]) and r.floor]
    if not zero:
        return None
    values = {(f, r.seed): v for r in zero for f, v in r.floor.items()}
    tests = [r.test_floor_map for r in zero if r.test_floor_map is not None]
    return Arm(run_name(name, [FLOOR]), values, {}, tests, tests, 0.0, 0)


@dataclass(frozen=True)
class Verdict:
    """A configuration against the baseline: paired differences' mean, standard error, count."""

    diff: float
    se: float
    pairs: int
    word: str


def verdict(arm: Arm, base: Arm, min_gain: float, noise: float) -> Verdict | None:
    """Paired by (fold, seed); the floor pairs with every seed of its fold."""
    keys = sorted(set(arm.values) & set(base.values))
    if not keys:
        return None
    diff = np.array([arm.values[k] - base.values[k] for k in keys])
    mean, se = paired_gain(diff)
    # A negative tune.min_gain keeps every tuning step; a verdict still needs a difference.
    min_gain = max(min_gain, 0.0)
    if clears_noise(diff, min_gain, noise):
        word = "better"
    elif clears_noise(-diff, min_gain, noise):
        word = "worse"
    else:
        word = "within noise"
    return Verdict(mean, se, len(keys), word)


def pick_baseline(plan: Plan, arms: list[Arm]) -> Arm:
    names = {a.name: a for a in arms}
    return names[baseline_row(plan, names)]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def table_rows(plan: Plan, arms: list[Arm], base: Arm) -> list[dict]:
    """One row per configuration, ranked by out-of-fold mAP (highest first)."""
    t = plan.cfg.tune
    rows = []
    for arm in sorted(arms, key=lambda a: a.mean, reverse=True):
        v = None if arm is base else verdict(arm, base, t.min_gain, t.noise)
        tuned = float(np.mean(list(arm.tuned.values()))) if arm.tuned else None
        rows.append({"run": arm.name.removeprefix(plan.name + "-"), "experiment": arm.name,
                     "runs": arm.runs, "oof_map": arm.mean, "oof_se": arm.se,
                     "per_fold": dict(zip(plan.folds, arm.fold_means(plan.folds), strict=True)),
                     "diff": None if v is None else v.diff, "diff_se": None if v is None else v.se,
                     "pairs": None if v is None else v.pairs,
                     "verdict": "baseline" if arm is base else (v.word if v else ""),
                     "tuned_map": tuned,
                     "test_map": float(np.mean(arm.test)) if arm.test else None,
                     "wall_s": arm.wall_s})
    return rows


def markdown(plan: Plan, rows: list[dict], base: Arm, wall_s: float, finished: int) -> str:
    t = plan.cfg.tune
    head = ["#", "run", "OOF mAP", "± se", f"per fold ({', '.join(map(str, plan.folds))})",
            f"vs {base.name.removeprefix(plan.name + '-')}", "± se", "verdict"]
    tuned = any(r["tuned_map"] is not None for r in rows)
    test = any(r["test_map"] is not None for r in rows)
    head += [*(["tuned OOF mAP"] if tuned else []), *(["test mAP"] if test else []), "minutes"]
    body = []
    for i, r in enumerate(rows, 1):
        line = [i, r["run"], _fmt(r["oof_map"]), _fmt(r["oof_se"]),
                " ".join(_fmt(v, 3) for v in r["per_fold"].values()),
                "" if r["diff"] is None else _signed(r["diff"]), _fmt(r["diff_se"]),
                r["verdict"]]
        line += [*([_fmt(r["tuned_map"])] if tuned else []),
                 *([_fmt(r["test_map"])] if test else []),
                 f"{r['wall_s'] / 60:.1f}" if r["wall_s"] else ""]
        body.append(line)
    axes = ", ".join(f"{a.key} = {' | '.join(a.values)}" for a in plan.axes) or "(none)"
    return (f"# Sweep {plan.name}\n\n"
            f"Grid: {axes}. Every run: {' '.join(plan.fixed) or '(the defaults)'}. Seeds "
            f"{', '.join(plan.seeds)}, folds {', '.join(map(str, plan.folds))}.\n\n"
            "Ranked by out-of-fold mAP (identity-balanced; mean over every fold and seed, "
            "per fold the mean over seeds). The difference to the baseline is paired by fold "
            f"and seed; a verdict needs more than {max(t.min_gain, 0.0)} and more than "
            f"{t.noise} "
            "standard error(s) of the paired differences (the tuner's rule: tune.min_gain, "
            "tune.noise). The test column is shown, never used to rank.\n\n"
            f"{markdown_table(head, body)}\n\n"
            f"{finished} of {len(plan.runs)} runs finished, {wall_s / 60:.1f} min of runs in "
            "all.\n")


def draw(plan: Plan, rows: list[dict], arms: list[Arm], base: Arm) -> bytes:
    """Each configuration's fold-and-seed values (dots), mean and standard error (bar), the
    baseline's mean (dashed line); beside it the local test where there is one."""
    from jaguar_reid.plotting import new_figure, png_bytes

    by_name = {a.name: a for a in arms}
    order = [by_name[r["experiment"]] for r in rows][::-1]  # best on top
    test = any(r["test_map"] is not None for r in rows)
    fig = new_figure(10 if test else 7, 1.2 + 0.38 * len(order))
    axes = fig.subplots(1, 2 if test else 1, sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [3, 1]} if test else None)[0]
    ax = axes[0]
    colours = {f: f"C{i}" for i, f in enumerate(plan.folds)}
    for y, arm in enumerate(order):
        for (fold, _), value in arm.values.items():
            ax.plot(value, y, "o", ms=4, alpha=0.6, color=colours.get(fold, "grey"))
        ax.errorbar(arm.mean, y, xerr=0 if np.isnan(arm.se) else arm.se, fmt="s", color="k",
                    ms=5, capsize=3)
    ax.axvline(base.mean, ls="--", color="grey", lw=1)
    for fold, colour in colours.items():
        ax.plot([], [], "o", ms=4, color=colour, label=f"fold {fold}")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(range(len(order)), [a.name.removeprefix(plan.name + "-") for a in order],
                  fontsize=8)
    ax.set_xlabel("out-of-fold mAP (dots: folds x seeds, coloured by fold; square: mean ± se)")
    ax.set_title(f"sweep {plan.name}: dashed = {base.name.removeprefix(plan.name + '-')}",
                 fontsize=9)
    if test:
        for y, arm in enumerate(order):
            if arm.test:
                axes[1].plot(arm.test, [y] * len(arm.test), "D", ms=4, color="C3")
        axes[1].set_xlabel("local test mAP")
    return png_bytes(fig)


def write_outputs(plan: Plan, results: list[RunResult]) -> str:
    """Table, JSON and plot of the sweep, put in place together; returns the table."""
    arms = arms_of(results)
    floor = floor_arm(plan.name, results)
    arms += [floor] if floor else []
    base = pick_baseline(plan, arms)
    rows = table_rows(plan, arms, base)
    wall_s = sum(r.wall_s for r in results)
    text = markdown(plan, rows, base, wall_s, len(results))
    png = draw(plan, rows, arms, base)
    out = sweep_dir(plan.cfg, plan.name)
    out.mkdir(parents=True, exist_ok=True)
    finish_commits(out, "sweep")
    doc = {"name": plan.name, "fixed": plan.fixed,
           "axes": {a.key: list(a.values) for a in plan.axes}, "seeds": list(plan.seeds),
           "folds": plan.folds, "baseline": base.name, "min_gain": plan.cfg.tune.min_gain,
           "noise": plan.cfg.tune.noise, "rows": rows, "wall_s": wall_s,
           "runs": [r.__dict__ for r in results]}
    commit_together({out / TABLE: lambda p: p.write_text(text),
                     out / DATA: lambda p: p.write_text(json_text(doc)),
                     out / PLOT: lambda p: p.write_bytes(png)}, "sweep")
    return text
