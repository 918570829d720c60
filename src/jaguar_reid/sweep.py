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
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaguar_reid import layout
from jaguar_reid.config import load_config
from jaguar_reid.data.source_ids import content_ids
from jaguar_reid.io_utils import UserInputError, atomic_write_text, json_text, read_json, run_main
from jaguar_reid.keys import SPECS
from jaguar_reid.sweeping.plan import (  # noqa: F401  (the names a caller of the sweep reads)
    LOGS_DIR,
    RUN_DEFAULTS,
    RUNS_DIR,
    SYNTAX,
    ZERO,
    Axis,
    Plan,
    Run,
    RunResult,
    make_runs,
    plan_sweep,
    run_name,
    split_arguments,
    sweep_dir,
)
from jaguar_reid.sweeping.table import Arm, verdict, write_outputs  # noqa: F401


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
    (values["<train.csv>"],) = content_ids(cfg, [layout.data_files(cfg).train])
    weights = Path(cfg.model.weights) if cfg.model.weights else None
    if weights is not None and weights.is_file():
        values["<weights>"] = [weights.stat().st_size, weights.stat().st_mtime_ns]
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_result(plan: Plan, run: Run, settings: str) -> RunResult | None:
    """The run's record when it was made with today's settings (`run_settings`) and steps,
    else None (a damaged record too: the run is made again)."""
    path = _record_path(plan, run)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        if data.get("settings") != settings or data.get("steps") != _steps(plan):
            return None
        return RunResult.from_dict(data["result"])
    except (UserInputError, KeyError, TypeError, ValueError, AttributeError):
        print(f"note: {path} is damaged; the run is made again")
        return None


def check_experiment_folder(plan: Plan, run: Run) -> None:
    """A folder of the run's name made with other after-training settings (by hand, or by
    this sweep with another `embed.tta`, say) holds finished folds training would skip and
    scores it would reuse. Recipe keys are training's to check (a finished fold of another
    recipe stops it), and are saved resolved (`auto` made concrete), so they are left to it."""
    from jaguar_reid.config import AUTO, load_saved_config
    from jaguar_reid.schema import AFTER

    cfg = load_config(_arguments(plan, run))
    saved = layout.model_dir(cfg) / layout.RUN_CONFIG
    if not saved.is_file():
        return
    theirs = load_saved_config(saved)
    differ = [f"{k}={theirs.get_path(k)!r} (this run {cfg.get_path(k)!r})"
              for k in _scored_keys(plan)
              if SPECS[k].role == AFTER and not SPECS[k].content
              and cfg.get_path(k) != AUTO and theirs.get_path(k) != cfg.get_path(k)]
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


def execute(plan: Plan, run: Run, settings: str) -> RunResult:
    """Train (finished folds skip), then tune and submit as the sweep asks; the record (with
    the run's `settings`) is written last, so a run killed at any point is run again (and
    resumes)."""
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
        "arguments": args, "settings": settings, "steps": _steps(plan),
        "result": result.__dict__}))
    return result


def run_all(plan: Plan, start: bool = True) -> list[RunResult]:
    """Every run's result, each run started unless finished earlier; with `start` false
    the finished ones only."""
    results = []
    for i, run in enumerate(plan.runs, 1):
        settings = run_settings(plan, run)
        done = finished_result(plan, run, settings)
        where = f"[{i}/{len(plan.runs)}] {run.exp}"
        if done is not None:
            print(f"{where}: finished earlier ({done.wall_s:.0f} s), skipped")
            results.append(done)
            continue
        if not start:
            print(f"{where}: not finished, left out")
            continue
        print(f"{where}: {' '.join(run.overrides)} ...", flush=True)
        result = execute(plan, run, settings)
        mean = np.mean(list(result.oof.values())) if result.oof else float("nan")
        print(f"{where}: OOF mAP {mean:.4f} in {result.wall_s:.0f} s", flush=True)
        results.append(result)
    return results


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
