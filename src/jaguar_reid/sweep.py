"""Sweeps: `python -m jaguar_reid.sweep config=X [key=a,b ...] [seed=42,43] [fold=0..1]`
(`jaguar-reid sweep`).

A grid of overrides becomes one experiment per combination and seed, trained one after another
(`jaguar-reid train`, each in its own process), named from the keys it changes
(`<sweep.name>-lr=2e-5-resize=crop-seed=42`), and scored out of fold on the chosen folds (raw;
with `sweep.tune` also tuned; with `sweep.test` also on a local test where one is labelled).
Two rows are always there: the zero-training run (`train.epochs=0`, each seed) and the plain
frozen floor. The table ranks the configurations by out-of-fold mAP (mean over every fold and
seed, with its standard error) and pairs each against `sweep.baseline` fold by fold and seed by
seed: the mean paired difference, its standard error and a verdict under the tuner's own noise
rule (`tune.min_gain`, `tune.noise`: `retrieval.search.clears_noise`). Table, JSON and plot are
written together into `<output_dir>/sweeps/<name>/` (`sweep.md`, `sweep.json`, `sweep.png`).

Resumable: a run whose record (`runs/<exp>.json`) was written with the same settings (the
resolved keys its scores depend on, train.csv, the starting weights) is not started again,
and a killed run restarts where training stopped (finished folds of the same recipe are
skipped, an unfinished one resumes from its checkpoint). An experiment folder of a run's name
made with other settings is refused, never taken as the run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaguar_reid import layout
from jaguar_reid.commit import commit_together, finish_commits
from jaguar_reid.config import Config, ConfigError, load_config, parse_fold_spec
from jaguar_reid.io_utils import UserInputError, atomic_write_text, json_text, read_json, run_main
from jaguar_reid.keys import SPECS
from jaguar_reid.manifest import file_sha256
from jaguar_reid.retrieval.search import clears_noise, paired_gain
from jaguar_reid.text import markdown_table

SWEEPS_DIR = "sweeps"
RUNS_DIR = "runs"
LOGS_DIR = "logs"
TABLE, DATA, PLOT = "sweep.md", "sweep.json", "sweep.png"
ZERO, FLOOR = "zero", "floor"
ALIASES = {"seeds": "seed"}
# What every run is given unless the command line says otherwise: a report per run costs
# time and the sweep draws its own figure.
RUN_DEFAULTS = ("report.enabled=false",)
_MAX_NAME = 120
MAX_RUNS = 500  # a grid beyond this is a typo, not a plan (each run trains for minutes)
# What every run shares by construction: the folds it is scored on, the sweep's own settings
# and where it runs. A grid over one would pair runs of different splits or places.
NOT_SWEPT_PREFIXES = ("sweep.", "folds.")
SYNTAX = """\
grid syntax:
  key=a,b,c     one run per value, for a number, a true/false switch or a key with choices
                (train.lr=1e-5,2e-5 data.resize=squash,crop train.epochs=0,2)
  key=a|b|c     the same for any key, lists and text included
                (data.mean='[0.5,0.5,0.5]|auto' model.weights='a.safetensors|b.safetensors')
  seed=42,43    (or seeds=...) the replicates: runs differing only by seed are one
                configuration; folds and seeds are paired against sweep.baseline
  other key=value pairs (fold=0..1, config=..., exps=...) apply to every run as written
Every run is an experiment <sweep.name>-<key=value>-...-seed=<s>; the table, its JSON and a
plot go to <output_dir>/sweeps/<sweep.name>/. Rerunning the same command skips finished runs.
"""


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Axis:
    """One swept key and the values it takes, as typed."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One experiment of the sweep: its name, its configuration's name (without the seed),
    its seed and the overrides that make it."""

    exp: str
    arm: str
    seed: str
    overrides: tuple[str, ...]


@dataclass
class Plan:
    """What a sweep command asks for."""

    name: str
    fixed: list[str]          # every run's arguments (config=, fold=, other keys), as typed
    axes: list[Axis]
    seeds: tuple[str, ...]
    cfg: Config               # the base config (fixed arguments only)
    folds: list[int]
    runs: list[Run] = field(default_factory=list)


def _is_list_key(key: str) -> bool:
    return SPECS[key].kind is list


def _comma_sweeps(key: str) -> bool:
    """Keys whose comma lists are grids: numbers, switches, choices (text keys such as fold
    or exps take commas as part of their value)."""
    spec = SPECS[key]
    return not _is_list_key(key) and (spec.kind in (int, float, bool) or bool(spec.choices))


def split_arguments(argv: list[str]) -> tuple[list[str], list[Axis]]:
    """(fixed arguments, grid axes) of a sweep command line."""
    fixed, axes = [], []
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"command line: expected key=value (e.g. train.lr=1e-5,2e-5), "
                              f"got {arg!r}")
        key, raw = arg.split("=", 1)
        key = ALIASES.get(key.strip(), key.strip())
        if key != "config" and key not in SPECS:
            load_config([f"{key}={raw}"])  # the one-line unknown-key error, with suggestions
        if key == "exp":
            raise ConfigError("command line: a sweep names its runs itself; give sweep.name "
                              "instead of exp")
        if key == "config":
            values = [raw]
        elif "|" in raw:
            values = raw.split("|")
        elif "," in raw and _comma_sweeps(key):
            values = raw.split(",")
        else:
            values = [raw]
        values = [v.strip() for v in values]
        if any(v == "" for v in values):
            raise ConfigError(f"command line: {key}={raw!r} has an empty value in its list")
        # The last of a key's values wins, as on every command line of the package (a grid
        # after a fixed value replaces it, and the reverse).
        fixed = [f for f in fixed if f.split("=", 1)[0] != key]
        axes = [a for a in axes if a.key != key]
        if len(values) > 1:
            _check_sweepable(key)
            axes.append(Axis(key, tuple(dict.fromkeys(values))))
        else:
            fixed.append(f"{key}={values[0]}")
    return fixed, axes


def _check_sweepable(key: str) -> None:
    from jaguar_reid.schema import RUNTIME

    if key == "config" or key == "fold" or key.startswith(NOT_SWEPT_PREFIXES) or (
            key in SPECS and SPECS[key].role == RUNTIME):
        raise ConfigError(f"command line: {key} cannot be swept: every run of a sweep shares "
                          "it (its folds, its place, the sweep's own settings); run one sweep "
                          "for each value")


def _short_names(axes: list[Axis]) -> dict[str, str]:
    """Each swept key's name in run names: its last part (`lr`), the whole key where two
    axes share a last part."""
    last = [a.key.rsplit(".", 1)[-1] for a in axes]
    return {a.key: (s if last.count(s) == 1 else a.key) for a, s in zip(axes, last, strict=True)}


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text).replace("+", "_")


def run_name(sweep: str, parts: list[str]) -> str:
    """`<sweep>-<part>-<part>`, made safe as one folder name; a long one ends in a digest."""
    name = "-".join([sweep, *map(_clean, parts)])
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:_MAX_NAME - 9]}~{digest}"


def make_runs(name: str, axes: list[Axis], seeds: tuple[str, ...]) -> list[Run]:
    """The zero-training run of each seed, then every combination of the grid with each seed."""
    short = _short_names([a for a in axes if a.key != "seed"])
    grid = [a for a in axes if a.key != "seed"]
    runs = []
    for seed in seeds:
        arm = run_name(name, [ZERO])
        runs.append(Run(run_name(name, [ZERO, f"seed={seed}"]), arm, seed,
                        ("train.epochs=0", f"seed={seed}")))
    for values in itertools.product(*(a.values for a in grid)):
        parts = [f"{short[a.key]}={v}" for a, v in zip(grid, values, strict=True)]
        overrides = tuple(f"{a.key}={v}" for a, v in zip(grid, values, strict=True))
        arm = run_name(name, parts or ["base"])
        for seed in seeds:
            runs.append(Run(run_name(name, [*(parts or ["base"]), f"seed={seed}"]), arm, seed,
                            (*overrides, f"seed={seed}")))
    return runs


def plan_sweep(argv: list[str]) -> Plan:
    """Parse and check a sweep command: every run's config is loaded (and so validated) here,
    before anything trains."""
    fixed, axes = split_arguments(argv)
    cfg = load_config(fixed)
    seed_axis = next((a for a in axes if a.key == "seed"), None)
    seeds = seed_axis.values if seed_axis else (str(cfg.seed),)
    name = cfg.sweep.name or cfg.exp
    folds = parse_fold_spec(cfg.fold, cfg.folds.n_folds)
    if any(not isinstance(f, int) for f in folds):
        raise ConfigError("command line: a sweep scores out of fold; fold=full has no "
                          "validation images (give fold=0..4 or a few folds)")
    count = len(seeds) * (1 + int(np.prod([len(a.values) for a in axes if a.key != "seed"])))
    if count > MAX_RUNS:
        raise ConfigError(f"command line: the grid makes {count} runs (more than {MAX_RUNS}); "
                          "sweep fewer values, or split it into several sweeps")
    plan = Plan(name, fixed, axes, seeds, cfg, folds, make_runs(name, axes, seeds))
    check_baseline(plan)
    exps = [r.exp for r in plan.runs]
    if len(set(exps)) != len(exps):
        raise ConfigError("command line: two runs of the sweep get the same name; give the "
                          "swept values distinct spellings")
    for run in plan.runs:
        load_config([*RUN_DEFAULTS, *fixed, *run.overrides, f"exp={run.exp}"])
    return plan


def sweep_dir(cfg: Config, name: str) -> Path:
    return layout.work_root(cfg) / SWEEPS_DIR / name


# --------------------------------------------------------------------------- running

@dataclass
class RunResult:
    """What one finished run scored: per fold out of fold (raw, tuned) and on the test."""

    exp: str
    arm: str
    seed: str
    oof: dict[int, float]
    oof_auc: dict[int, float]
    floor: dict[int, float]
    tuned: dict[int, float]
    test_map: float | None
    test_floor_map: float | None
    wall_s: float

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        def by_fold(values: dict) -> dict[int, float]:
            return {int(k): float(v) for k, v in values.items()}

        return cls(data["exp"], data["arm"], data["seed"], by_fold(data["oof"]),
                   by_fold(data["oof_auc"]), by_fold(data["floor"]), by_fold(data["tuned"]),
                   data["test_map"], data["test_floor_map"], float(data["wall_s"]))


def _arguments(plan: Plan, run: Run) -> list[str]:
    """A run's command line: the sweep's own keys stay out (another baseline or table
    setting is no reason to run anything again)."""
    fixed = [a for a in plan.fixed if not a.startswith("sweep.")]
    return [*RUN_DEFAULTS, *fixed, *run.overrides, f"exp={run.exp}"]


def _record_path(plan: Plan, run: Run) -> Path:
    return sweep_dir(plan.cfg, plan.name) / RUNS_DIR / f"{run.exp}.json"


def _scored_keys(plan: Plan) -> list[str]:
    """The keys a run's scores depend on: all but where it runs, the sweep's own and the
    report's, and tuning's where the sweep does not tune."""
    from jaguar_reid.schema import RUNTIME

    skip = ("sweep.", "report.", *(() if "tune" in _steps(plan) else ("tune.",)))
    return [k for k, spec in SPECS.items() if spec.role != RUNTIME and not k.startswith(skip)]


def run_settings(plan: Plan, run: Run) -> str:
    """A digest of what makes the run's scores: its resolved keys (so an edited config file
    is another run, a moved output folder the same), train.csv's content and the starting
    weights' size and time."""
    cfg = load_config(_arguments(plan, run))
    values = {k: cfg.get_path(k) for k in _scored_keys(plan)}
    train_csv = layout.data_files(cfg).train
    values["<train.csv>"] = file_sha256(train_csv) if train_csv.is_file() else None
    weights = Path(cfg.model.weights) if cfg.model.weights else None
    if weights is not None and weights.is_file():
        values["<weights>"] = [weights.stat().st_size, weights.stat().st_mtime_ns]
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_result(plan: Plan, run: Run) -> RunResult | None:
    """The run's record when it was made with today's settings and steps, else None (a
    damaged record too: the run is made again)."""
    path = _record_path(plan, run)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        if data.get("settings") != run_settings(plan, run) or data.get("steps") != _steps(plan):
            return None
        return RunResult.from_dict(data["result"])
    except (UserInputError, KeyError, TypeError, ValueError, AttributeError):
        print(f"note: {path} is damaged; the run is made again")
        return None


def check_experiment_folder(plan: Plan, run: Run) -> None:
    """A folder of the run's name made with other settings (by hand, or by this sweep under
    another config) holds finished folds training would skip and scores it would reuse."""
    from jaguar_reid.config import AUTO, load_saved_config

    cfg = load_config(_arguments(plan, run))
    saved = layout.model_dir(cfg) / layout.RUN_CONFIG
    if not saved.is_file():
        return
    theirs = load_saved_config(saved)
    differ = [f"{k}={theirs.get_path(k)!r} (this run {cfg.get_path(k)!r})"
              for k in _scored_keys(plan)
              if not SPECS[k].content and not (SPECS[k].auto and cfg.get_path(k) == AUTO)
              and theirs.get_path(k) != cfg.get_path(k)]
    if differ:
        raise UserInputError(f"sweep: {saved.parent} was made with other settings than run "
                             f"{run.exp}: {'; '.join(differ[:3])}; give the sweep another "
                             "sweep.name, or delete that folder")


def _steps(plan: Plan) -> list[str]:
    steps = ["train"]
    if plan.cfg.sweep.tune:
        steps.append("tune")
    if plan.cfg.sweep.test and layout.data_files(plan.cfg).test_labels.is_file():
        steps.append("submit")
    return steps


class _Child:
    """The step process running now, ended with the sweep (a kill of the sweep must not
    leave a training behind)."""

    process: subprocess.Popen | None = None


def _end_child(signum: int, _frame: object) -> None:
    if _Child.process is not None and _Child.process.poll() is None:
        _Child.process.terminate()
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    """In the child, before it runs: a SIGTERM when the sweep dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_step(step: str, args: list[str], log: Path) -> None:
    """`jaguar-reid <step> args` in a process of its own, its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(f"\n$ jaguar-reid {step} {' '.join(args)}\n")
        handle.flush()
        _Child.process = subprocess.Popen(
            [sys.executable, "-m", "jaguar_reid.cli", step, *args], stdout=handle,
            stderr=subprocess.STDOUT, cwd=Path.cwd(),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        code = _Child.process.wait()
        _Child.process = None
    if code != 0:
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        last = lines[-1] if lines else "(no output)"
        if "different config" in last:  # the keys every run shares changed
            last += "; in a sweep: give it a new sweep.name"
        raise UserInputError(f"sweep: `jaguar-reid {step}` failed (exit {code}) for this run: "
                             f"{last}  (whole log: {log})")


def _per_fold(rows: list[dict], folds: list[int], value) -> dict[int, float]:
    return {int(r["fold"]): float(value(r)) for r in rows
            if int(r["fold"]) in folds and value(r) is not None}


def read_result(plan: Plan, run: Run, wall_s: float) -> RunResult:
    """A finished run's scores from the files its steps wrote."""
    cfg = load_config([*plan.fixed, f"exp={run.exp}"])
    oof = read_json(layout.read_path(cfg, layout.OOF_SCORES))
    rows = oof["folds"]
    tuned: dict[int, float] = {}
    post = layout.read_path(cfg, layout.POST_CHOICE)
    if "tune" in _steps(plan) and post.is_file():
        step = next(s for s in read_json(post)["steps"] if s.get("step") == "tuned")
        tuned = _per_fold(step["per_fold"], plan.folds, lambda r: r["map"])
    test_map = test_floor = None
    scores = layout.submission_extra(layout.submission_path(cfg, run.exp), layout.SCORES_EXTRA)
    if "submit" in _steps(plan) and scores.is_file():
        doc = read_json(scores)
        test_map = doc.get("test", {}).get("map")
        test_floor = (doc.get("floor") or {}).get("map")
    return RunResult(run.exp, run.arm, run.seed,
                     _per_fold(rows, plan.folds, lambda r: r["map"]),
                     _per_fold(rows, plan.folds, lambda r: r["pair_auc"]),
                     _per_fold(rows, plan.folds, lambda r: (r.get("floor") or {}).get("map")),
                     tuned, test_map, test_floor, wall_s)


def execute(plan: Plan, run: Run) -> RunResult:
    """Train (finished folds skip), then tune and submit as the sweep asks; the record is
    written last, so a run killed at any point is run again (and resumes)."""
    log = sweep_dir(plan.cfg, plan.name) / LOGS_DIR / f"{run.exp}.log"
    args = _arguments(plan, run)
    check_experiment_folder(plan, run)
    start = time.perf_counter()
    run_step("train", args, log)
    folds = ",".join(map(str, plan.folds))
    if "tune" in _steps(plan):
        run_step("tune", args, log)
    if "submit" in _steps(plan):
        run_step("submit", [*args, f"submit.folds={folds}"], log)
    result = read_result(plan, run, time.perf_counter() - start)
    atomic_write_text(_record_path(plan, run), json_text({
        "arguments": args, "settings": run_settings(plan, run), "steps": _steps(plan),
        "result": result.__dict__}))
    return result


def run_all(plan: Plan, start: bool = True) -> list[RunResult]:
    """Every run's result, each run started unless finished earlier; with `start` false
    the finished ones only."""
    results = []
    for i, run in enumerate(plan.runs, 1):
        done = finished_result(plan, run)
        where = f"[{i}/{len(plan.runs)}] {run.exp}"
        if done is not None:
            print(f"{where}: finished earlier ({done.wall_s:.0f} s), skipped")
            results.append(done)
            continue
        if not start:
            print(f"{where}: not finished, left out")
            continue
        print(f"{where}: {' '.join(run.overrides)} ...", flush=True)
        result = execute(plan, run)
        mean = np.mean(list(result.oof.values())) if result.oof else float("nan")
        print(f"{where}: OOF mAP {mean:.4f} in {result.wall_s:.0f} s", flush=True)
        results.append(result)
    return results


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


def check_baseline(plan: Plan) -> None:
    """`sweep.baseline` names a row this sweep will have (before anything trains)."""
    arms = {r.arm for r in plan.runs} | ({run_name(plan.name, [FLOOR])}
                                         if plan.cfg.floor.enabled else set())
    wanted = plan.cfg.sweep.baseline
    if not {wanted, run_name(plan.name, [wanted])} & arms:
        raise ConfigError(f"command line: sweep.baseline={wanted!r} is not a row of this "
                          "sweep; one of: " + ", ".join(sorted(
                              a.removeprefix(plan.name + "-") for a in arms)))


def pick_baseline(plan: Plan, arms: list[Arm]) -> Arm:
    wanted = plan.cfg.sweep.baseline
    names = {a.name: a for a in arms}
    for candidate in (wanted, run_name(plan.name, [wanted])):
        if candidate in names:
            return names[candidate]
    raise ConfigError(f"command line: sweep.baseline={wanted!r} is not a row of this sweep; "
                      f"one of {ZERO}, {FLOOR}, or a name: "
                      f"{', '.join(n.removeprefix(plan.name + '-') for n in names)}")


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


# --------------------------------------------------------------------------- the command

def usage() -> str:
    from jaguar_reid.cli import step_help

    try:
        keys_help = step_help("sweep")
    except KeyError:  # the command table does not list the step yet
        keys_help = "usage: python -m jaguar_reid.sweep [config=configs/X.yaml] [key=a,b ...]"
    return f"{keys_help}\n\n{SYNTAX}"


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(usage())
        return
    plan = plan_sweep([a for a in argv if a != "--print-config"])
    if "--print-config" in argv or plan.cfg.sweep.dry_run:
        print(f"sweep {plan.name}: {len(plan.runs)} runs on folds "
              f"{', '.join(map(str, plan.folds))}")
        for run in plan.runs:
            print(f"  {run.exp}: {' '.join(run.overrides)}")
        return
    signal.signal(signal.SIGTERM, _end_child)
    start = time.perf_counter()
    results = run_all(plan, start=not plan.cfg.sweep.table_only)
    if not results:
        raise UserInputError(f"sweep {plan.name}: no run has finished yet")
    text = write_outputs(plan, results)
    print(text)
    print(f"sweep {plan.name}: {len(results)} runs ready, this invocation took "
          f"{(time.perf_counter() - start) / 60:.1f} min; {sweep_dir(plan.cfg, plan.name)}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
