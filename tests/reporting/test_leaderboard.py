"""Leaderboard of runs: rows from an experiment's files, appends that lose nothing when two
processes finish at once, ranking and the terminal table."""

import csv
import multiprocessing
from pathlib import Path

import pytest

from jaguar_reid import layout
from jaguar_reid.config import config_digest, load_config
from jaguar_reid.io_utils import UserInputError, atomic_write_json
from jaguar_reid.reporting.runs import (
    COLUMNS,
    append_row,
    code_version,
    format_leaderboard,
    main,
    rank_rows,
    read_leaderboard,
    record_run,
    short_commit,
)
from tests.helpers import fake_experiment


def make_cfg(root: Path, exp: str = "exp1", folds=(0, 2), postprocess: bool = True):
    cfg = load_config([f"output_dir={root}", f"exp={exp}", "model.backbone=resnet18",
                       "data.img_size=64"])
    exp_dir = fake_experiment(cfg, folds, weights=None)
    fake_experiment(cfg, (1,), weights=None, finished=False)  # started, never finished
    atomic_write_json(layout.work_dir(cfg) / layout.OOF_SCORES, {
        "folds": [{"fold": f} for f in folds],  # the folds scored, as scoring writes them
        "mean": {"pair_auc": 0.912345678, "map": 0.712345678}})
    if postprocess:
        atomic_write_json(exp_dir / layout.POST_CHOICE, {"metric": "map", "settings": {},
                          "steps": [{"step": "raw", "map": 0.7, "pair_auc": 0.9},
                                    {"step": "tuned", "map": 0.75, "pair_auc": 0.93}]})
    return cfg


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_record_run_without_test_labels_leaves_test_columns_blank(tmp_path):
    cfg = make_cfg(tmp_path, postprocess=False)
    row = record_run(cfg, "train", wall_s=12.34, device="cpu")
    rows = read_rows(layout.leaderboard_path(cfg))
    assert rows == [row] and list(rows[0]) == list(COLUMNS)
    assert row["test_map"] == row["test_pair_auc"] == ""
    assert row["oof_map_post"] == row["oof_pair_auc_post"] == ""
    assert row["oof_map"] == "0.712346" and row["oof_pair_auc"] == "0.912346"
    assert (row["event"], row["experiment"], row["backbone"], row["img_size"]) == \
        ("train", "exp1", "resnet18", "64")
    assert row["folds"] == "0,2" and row["wall_s"] == "12.3" and row["device"] == "cpu"
    assert row["config_digest"] == config_digest(cfg)
    assert row["commit"] == short_commit(code_version())
    assert row["time"].endswith("+00:00")


def test_record_submit_with_test_scores_and_post_processing(tmp_path):
    cfg = make_cfg(tmp_path)
    record_run(cfg, "train")
    record_run(cfg, "submit", test_scores={"map": 0.6, "pair_auc": 0.95})
    first, second = read_rows(layout.leaderboard_path(cfg))
    assert first["event"] == "train" and first["wall_s"] == first["test_map"] == ""
    assert second["event"] == "submit"
    assert (second["test_map"], second["test_pair_auc"]) == ("0.600000", "0.950000")
    assert (second["oof_map_post"], second["oof_pair_auc_post"]) == ("0.750000", "0.930000")
    with pytest.raises(ValueError, match="event must be one of train, submit"):
        record_run(cfg, "trained")


def _append_many(path: str, worker: int, count: int, start) -> None:
    start.wait()  # both processes begin together
    for i in range(count):
        append_row(Path(path), {"experiment": f"w{worker}", "wall_s": str(worker * 1000 + i)})


def test_two_processes_appending_at_once_lose_no_row(tmp_path):
    path = tmp_path / "leaderboard.csv"
    for i in range(3):
        append_row(path, {"experiment": "earlier", "wall_s": str(-1 - i)})
    count = 25
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [ctx.Process(target=_append_many, args=(str(path), w, count, start))
               for w in (1, 2)]
    for p in workers:
        p.start()
    start.set()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0
    rows = read_rows(path)
    expected = {str(-1 - i) for i in range(3)} | {str(w * 1000 + i) for w in (1, 2)
                                                  for i in range(count)}
    assert len(rows) == 3 + 2 * count and {r["wall_s"] for r in rows} == expected
    assert [r["wall_s"] for r in rows[:3]] == ["-1", "-2", "-3"]  # earlier rows first, kept
    assert not list(tmp_path.glob(".leaderboard.csv.*"))  # no temporary file left behind


def test_columns_of_other_versions_are_kept(tmp_path):
    path = tmp_path / "leaderboard.csv"
    path.write_text("time,experiment,old_column\nt0,first,keep me\n")
    append_row(path, {"time": "t1", "experiment": "second", "test_map": "0.5"})
    columns, rows = read_leaderboard(path)
    assert columns == ["time", "experiment", "old_column", "test_map"]
    assert rows == [{"time": "t0", "experiment": "first", "old_column": "keep me",
                     "test_map": ""},
                    {"time": "t1", "experiment": "second", "old_column": "", "test_map": "0.5"}]


def test_rank_rows_highest_first_blanks_last():
    rows = [{"e": "a", "m": "0.5"}, {"e": "b", "m": ""}, {"e": "c", "m": "0.9"},
            {"e": "d", "m": "nan"}, {"e": "f", "m": "10"}]
    assert [r["e"] for r in rank_rows(rows, "m")] == ["f", "c", "a", "b", "d"]
    assert [r["e"] for r in rank_rows(rows, "e")] == ["f", "d", "c", "b", "a"]


def test_table_is_aligned():
    rows = [{"experiment": "long_name", "oof_map": "0.712345"},
            {"experiment": "x", "oof_map": ""}]
    lines = format_leaderboard(rows, ["experiment", "oof_map"]).splitlines()
    assert lines[0].split() == ["#", "experiment", "oof_map"]
    assert lines[2].split() == ["1", "long_name", "0.7123"]
    assert lines[2].index("long_name") == lines[3].index("x") == lines[0].index("experiment")
    assert lines[2].rindex("0.7123") + len("0.7123") == len(lines[0])  # numbers right-aligned


def test_main_ranks_and_names_valid_columns(tmp_path, capsys):
    for exp, value in (("low", "0.1"), ("high", "0.9"), ("none", "")):
        append_row(tmp_path / layout.LEADERBOARD, {**dict.fromkeys(COLUMNS, ""),
                                                  "experiment": exp, "oof_map": value})
    main([f"output_dir={tmp_path}"])
    out = capsys.readouterr().out.splitlines()
    assert "ranked by oof_map" in out[0]
    assert [line.split()[1] for line in out[3:]] == ["high", "low", "none"]
    with pytest.raises(UserInputError, match="report.rank_by='speed'.*choose one of time, event"):
        main([f"output_dir={tmp_path}", "report.rank_by=speed"])
    with pytest.raises(FileNotFoundError, match="no leaderboard yet"):
        main([f"output_dir={tmp_path / 'empty'}"])
