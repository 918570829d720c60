"""The plan of a sweep (`jaguar_reid.sweep`): its command line read into a grid of runs, each
named and its config checked before anything trains; and the record of what a finished run
scored."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaguar_reid import layout
from jaguar_reid.config import Config, ConfigError, load_config, parse_fold_spec
from jaguar_reid.keys import SPECS

SWEEPS_DIR = "sweeps"
RUNS_DIR = "runs"
LOGS_DIR = "logs"
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
    grid = [a for a in axes if a.key != "seed"]
    short = _short_names(grid)
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


def check_baseline(plan: Plan) -> None:
    """`sweep.baseline` names a row this sweep will have (before anything trains)."""
    arms = {r.arm for r in plan.runs} | ({run_name(plan.name, [FLOOR])}
                                         if plan.cfg.floor.enabled else set())
    baseline_row(plan, arms)


def baseline_row(plan: Plan, rows: Iterable[str]) -> str:
    """The row of `rows` that `sweep.baseline` names (as given, or as `<sweep>-<name>`); one
    line listing the rows when none is."""
    wanted = plan.cfg.sweep.baseline
    rows = set(rows)
    for candidate in (wanted, run_name(plan.name, [wanted])):
        if candidate in rows:
            return candidate
    raise ConfigError(f"command line: sweep.baseline={wanted!r} is not a row of this "
                      "sweep; one of: " + ", ".join(sorted(
                          a.removeprefix(plan.name + "-") for a in rows)))


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
