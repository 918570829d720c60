"""Sweeps: the grid a command line makes, the runs' names, the paired verdicts against an
independent computation, resuming (a finished run is not started again), and the table and
plot written together. The steps themselves are stood in for: training has its own tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaguar_reid import layout, sweep
from jaguar_reid.config import ConfigError, load_config, save_config
from jaguar_reid.io_utils import UserInputError
from jaguar_reid.retrieval.search import clears_noise
from tests.helpers import TINY_ARGS


def _base(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [*TINY_ARGS, f"data.dir={data}", f"output_dir={tmp_path / 'out'}", "fold=0..1",
            "sweep.name=s", *extra]


def test_comma_lists_sweep_numbers_and_choices_bars_sweep_anything():
    fixed, axes = sweep.split_arguments([
        "config=configs/demo.yaml", "train.lr=1e-5,2e-5", "data.resize=squash|crop",
        "seeds=42,43", "data.mean=[0.5,0.5,0.5]|auto", "fold=0,1", "exps=a,b",
        "train.freeze_bn=true,false"])
    assert fixed == ["config=configs/demo.yaml", "fold=0,1", "exps=a,b"]
    assert {a.key: a.values for a in axes} == {
        "train.lr": ("1e-5", "2e-5"), "data.resize": ("squash", "crop"),
        "seed": ("42", "43"), "data.mean": ("[0.5,0.5,0.5]", "auto"),
        "train.freeze_bn": ("true", "false")}
    # A list-valued key given with commas is one value, as train.sh reads it.
    fixed, axes = sweep.split_arguments(["tune.views=flip,zoom1.15"])
    assert fixed == ["tune.views=flip,zoom1.15"] and axes == []


def test_the_last_value_of_a_key_wins_fixed_or_swept():
    assert sweep.split_arguments(["train.lr=1e-5,2e-5", "train.lr=3e-5|4e-5"])[1] == [
        sweep.Axis("train.lr", ("3e-5", "4e-5"))]
    assert sweep.split_arguments(["train.lr=1e-4", "train.lr=2e-4,3e-4"]) == (
        [], [sweep.Axis("train.lr", ("2e-4", "3e-4"))])
    assert sweep.split_arguments(["seeds=42,43", "seed=7"]) == (["seed=7"], [])


@pytest.mark.parametrize("args, message", [
    (["exp=x"], "sweep.name"),
    (["train.lrr=1,2"], "did you mean train.lr"),
    (["train.lr=1e-5,"], "empty value"),
    (["oops"], "expected key=value"),
    (["output_dir=a|b"], "output_dir cannot be swept"),
    (["fold=0|1"], "fold cannot be swept"),
    (["folds.n_folds=2,3"], "folds.n_folds cannot be swept"),
    (["sweep.name=a|b"], "sweep.name cannot be swept"),
    (["data.dir=a|b"], "data.dir cannot be swept"),
])
def test_bad_sweep_arguments_are_one_line_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        sweep.split_arguments(args)


def test_run_names_are_stable_readable_and_distinct():
    axes = [sweep.Axis("train.lr", ("1e-5", "2e-5")), sweep.Axis("post.k1", ("5",)),
            sweep.Axis("tune.k1", ("7",))]
    runs = sweep.make_runs("s", axes, ("42", "43"))
    assert [r.exp for r in runs[:2]] == ["s-zero-seed=42", "s-zero-seed=43"]
    assert runs[0].overrides == ("train.epochs=0", "seed=42")
    assert runs[2].exp == "s-lr=1e-5-post.k1=5-tune.k1=7-seed=42"  # k1 twice: whole keys
    assert runs[2].arm == "s-lr=1e-5-post.k1=5-tune.k1=7"
    assert runs[2].overrides == ("train.lr=1e-5", "post.k1=5", "tune.k1=7", "seed=42")
    assert len({r.exp for r in runs}) == len(runs) == 6
    assert sweep.make_runs("s", axes, ("42", "43")) == runs  # the same command, the same names
    long = sweep.run_name("s", ["x" * 300])
    assert len(long) <= 120 and long != sweep.run_name("s", ["x" * 301])
    assert sweep.run_name("s", ["model.weights=a/b c.pth"]) == "s-model.weights=a_b_c.pth"


def _arm(name: str, values: dict) -> sweep.Arm:
    return sweep.Arm(name, values, {}, [], [], 0.0, 1)


def test_verdicts_pair_folds_and_seeds_under_the_tuners_rule():
    keys = [(0, "42"), (1, "42"), (0, "43"), (1, "43")]
    base = _arm("b", dict(zip(keys, [0.80, 0.70, 0.81, 0.69], strict=True)))
    up = _arm("u", dict(zip(keys, [0.83, 0.72, 0.84, 0.73], strict=True)))
    mixed = _arm("m", dict(zip(keys, [0.83, 0.66, 0.80, 0.72], strict=True)))
    diff = np.array([0.03, 0.02, 0.03, 0.04])
    v = sweep.verdict(up, base, 0.001, 1.0)
    assert v.diff == pytest.approx(diff.mean())
    assert v.se == pytest.approx(diff.std(ddof=1) / 2) and v.pairs == 4 and v.word == "better"
    assert sweep.verdict(base, up, 0.001, 1.0).word == "worse"
    assert sweep.verdict(mixed, base, 0.001, 1.0).word == "within noise"  # +0.03 .. -0.04
    # The same rule the tuner keeps a step by.
    assert clears_noise(diff, 0.001, 1.0) and not clears_noise(diff, 0.05, 1.0)
    assert not clears_noise(np.array([0.03, -0.02]), 0.001, 1.0)
    assert clears_noise(np.array([-0.5, 0.4]), -1, 1.0)  # min_gain -1 keeps every step
    # ... but a negative min_gain makes no verdict of a worse configuration "better".
    assert sweep.verdict(base, up, -0.05, 1.0).word == "worse"
    assert sweep.verdict(mixed, base, -0.2, 1.0).word == "within noise"
    # Arms share only some pairs: only those count.
    part = _arm("p", {(0, "42"): 0.9})
    assert sweep.verdict(part, base, 0.001, 1.0).pairs == 1


def _fake_steps(monkeypatch, calls: list, folds=(0, 1)) -> None:
    """Training and submission stood in for: they write what the real steps write."""

    def fake(step: str, args: list[str], log: Path) -> None:
        calls.append((step, args))
        cfg = load_config(args)
        seed = cfg.seed
        lr = cfg.train.lr if cfg.train.epochs else 0.0
        out = layout.work_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        if step == "train":
            rows = [{"fold": f, "map": 0.5 + 10 * lr + 0.01 * f + 0.001 * (seed - 42),
                     "pair_auc": 0.9, "floor": {"map": 0.45 + 0.01 * f}} for f in folds]
            (out / layout.OOF_SCORES).write_text(json.dumps({"folds": rows}))
        elif step == "submit":
            scores = layout.submission_extra(layout.submission_path(cfg, cfg.exp),
                                             layout.SCORES_EXTRA)
            scores.write_text(json.dumps({"test": {"map": 0.3 + 10 * lr},
                                          "floor": {"map": 0.2}}))
    monkeypatch.setattr(sweep, "run_step", fake)


def test_a_sweep_runs_resumes_and_writes_its_table_and_plot(demo_dir, tmp_path, monkeypatch,
                                                            capsys):
    calls: list = []
    _fake_steps(monkeypatch, calls)
    args = _base(tmp_path, demo_dir, "train.lr=1e-3,3e-3", "seeds=42,43")
    sweep.main(args)
    trained = [c for c in calls if c[0] == "train"]
    assert len(trained) == 6  # 2 zero-training runs + 2 learning rates x 2 seeds
    assert [c[0] for c in calls].count("submit") == 6  # the demo has test labels
    assert any("train.epochs=0" in c[1] for c in trained)
    assert all("report.enabled=false" in c[1] for c in trained)

    folder = tmp_path / "out" / "sweeps" / "s"
    doc = json.loads((folder / "sweep.json").read_text())
    rows = doc["rows"]
    assert [r["run"] for r in rows] == ["lr=3e-3", "lr=1e-3", "zero", "floor"]
    best = rows[0]
    # Per fold: mean over seeds (0.5 + 0.03 + 0.01 f + 0.0005); against zero (0.5 + 0.01 f
    # + ...): +0.03 in every pair, so better.
    assert best["per_fold"] == {"0": pytest.approx(0.5305), "1": pytest.approx(0.5405)}
    assert best["diff"] == pytest.approx(0.03) and best["verdict"] == "better"
    assert best["test_map"] == pytest.approx(0.33)
    assert rows[2]["verdict"] == "baseline"
    assert rows[3]["oof_map"] == pytest.approx(0.455) and rows[3]["verdict"] == "worse"
    table = (folder / "sweep.md").read_text()
    assert "| 1 | lr=3e-3 | 0.5355 |" in table and "vs zero" in table
    with Image.open(folder / "sweep.png") as png:
        assert png.size[0] > 300

    # Again: every run finished earlier is skipped, nothing is started.
    calls.clear()
    capsys.readouterr()
    sweep.main(args)
    assert calls == []
    assert capsys.readouterr().out.count("finished earlier") == 6

    # The table from what has finished, while a run is missing: nothing starts.
    (folder / "runs" / "s-lr=1e-3-seed=43.json").rename(tmp_path / "kept.json")
    sweep.main([*args, "sweep.table_only=true"])
    assert calls == [] and "5 of 6 runs finished" in (folder / "sweep.md").read_text()
    (tmp_path / "kept.json").rename(folder / "runs" / "s-lr=1e-3-seed=43.json")

    # A run whose record is gone (killed before it was written) runs again, alone; another
    # baseline changes the verdicts only.
    (folder / "runs" / "s-lr=1e-3-seed=43.json").unlink()
    sweep.main([*args, "sweep.baseline=lr=1e-3"])
    assert [c[0] for c in calls] == ["train", "submit"]
    assert "seed=43" in calls[0][1] and "train.lr=1e-3" in calls[0][1]
    rows = json.loads((folder / "sweep.json").read_text())["rows"]
    assert {r["run"]: r["verdict"] for r in rows}["lr=1e-3"] == "baseline"


def test_baseline_must_be_a_row_and_fold_full_is_refused(demo_dir, tmp_path, monkeypatch):
    calls: list = []
    _fake_steps(monkeypatch, calls)
    with pytest.raises(ConfigError, match="sweep.baseline='nope' is not a row"):
        sweep.main(_base(tmp_path, demo_dir, "train.lr=1e-3,3e-3", "sweep.baseline=nope"))
    assert calls == []  # refused before anything trains
    with pytest.raises(ConfigError, match="not a row.*one of: lr=1e-3, lr=3e-3, zero$"):
        sweep.plan_sweep(_base(tmp_path, demo_dir, "train.lr=1e-3,3e-3", "sweep.baseline=floor"))
    # 2 seeds x (zero + 40 x 40 x 40)
    with pytest.raises(ConfigError, match="makes 128002 runs"):
        sweep.plan_sweep(_base(tmp_path, demo_dir, "seeds=1,2", *(
            f"{k}={','.join(str(i) for i in range(1, 41))}"
            for k in ("train.epochs", "post.k1", "post.k2"))))
    with pytest.raises(ConfigError, match="fold=full"):
        sweep.plan_sweep([*_base(tmp_path, demo_dir), "fold=full"])
    # Every run's config is checked before anything trains.
    with pytest.raises(ConfigError, match="train.lr"):
        sweep.plan_sweep(_base(tmp_path, demo_dir, "train.lr=1e-3,-1"))


def test_dry_run_lists_the_runs_and_starts_nothing(demo_dir, tmp_path, monkeypatch, capsys):
    calls: list = []
    _fake_steps(monkeypatch, calls)
    sweep.main(_base(tmp_path, demo_dir, "data.resize=squash,crop", "sweep.dry_run=true"))
    out = capsys.readouterr().out
    assert calls == [] and "3 runs on folds 0, 1" in out and "s-resize=crop-seed=42" in out
    sweep.main(["--help"])
    assert "key=a|b|c" in capsys.readouterr().out


def test_a_changed_config_file_or_a_damaged_record_makes_runs_again(demo_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """Runs are matched on what their settings are, not on how the command spells them."""
    calls: list = []
    _fake_steps(monkeypatch, calls)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: demo.yaml\ntrain:\n  head_lr: 0.001\n")
    args = [f"config={recipe}", *_base(tmp_path, demo_dir, "train.lr=1e-3")[:]]
    args = [a for a in args if not a.startswith("config=configs/")]
    sweep.main(args)
    assert len(calls) == 4  # zero and lr=1e-3: train and submit each
    calls.clear()
    moved = tmp_path / "moved.yaml"  # the same settings under another path: nothing to do
    moved.write_text(recipe.read_text())
    sweep.main([f"config={moved}" if a.startswith("config=") else a for a in args])
    assert calls == []
    recipe.write_text("base: demo.yaml\ntrain:\n  head_lr: 0.002\n")  # edited in place
    sweep.main(args)
    assert [c[0] for c in calls] == ["train", "submit", "train", "submit"]
    calls.clear()
    record = tmp_path / "out" / "sweeps" / "s" / "runs" / "s-base-seed=42.json"
    record.write_text(record.read_text()[:50])  # a write cut short
    capsys.readouterr()
    sweep.main(args)
    assert "is damaged; the run is made again" in capsys.readouterr().out
    assert [c[0] for c in calls] == ["train", "submit"]
    assert json.loads(record.read_text())["result"]["exp"] == "s-base-seed=42"


def test_a_folder_of_a_runs_name_with_other_settings_is_refused(demo_dir, tmp_path,
                                                                monkeypatch):
    """Training would skip its finished folds and the sweep would rank their old scores."""
    calls: list = []
    _fake_steps(monkeypatch, calls)
    args = _base(tmp_path, demo_dir, "train.lr=1e-3")
    by_hand = load_config([*args, "exp=s-base-seed=42", "train.lr=1e-3",
                           "embed.tta=[orig,flip]"])
    folder = layout.model_dir(by_hand)
    folder.mkdir(parents=True)
    save_config(by_hand, folder / layout.RUN_CONFIG)
    with pytest.raises(UserInputError, match="made with other settings.*embed.tta"):
        sweep.main(args)
    assert [c[1][-1] for c in calls if c[0] == "train"] == ["exp=s-zero-seed=42"]


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_sweep_takes_its_step_with_it(tmp_path):
    """SIGKILL cannot be caught: the step's process is told by the kernel instead."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from jaguar_reid import sweep\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " preexec_fn=sweep._die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and \
            "zombie" not in Path(f"/proc/{child}/status").read_text(errors="replace"):
        time.sleep(0.05)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text(errors="replace")


def test_a_resumed_run_is_not_refused_for_what_training_resolved(demo_dir, tmp_path,
                                                                 monkeypatch):
    """Training saves `auto` keys resolved and forces the zero run's retrieval: the folder of
    a killed run of the same sweep is that run's, and resumes."""
    calls: list = []
    _fake_steps(monkeypatch, calls)
    args = _base(tmp_path, demo_dir, "train.lr=1e-3")
    for exp, extra in (("s-zero-seed=42", ["train.epochs=0", "model.retrieval=backbone"]),
                       ("s-base-seed=42", ["train.lr=1e-3"])):
        saved = load_config([*args, f"exp={exp}", *extra, "data.interpolation=bicubic"])
        layout.model_dir(saved).mkdir(parents=True)
        save_config(saved, layout.model_dir(saved) / layout.RUN_CONFIG)
    sweep.main(args)
    assert [c[0] for c in calls] == ["train", "submit", "train", "submit"]

