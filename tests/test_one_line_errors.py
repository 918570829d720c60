"""Every user error at the command level is one line naming the file or key and the fix, exit
2, no traceback (JAGUAR_REID_DEBUG=1 shows it)."""

from __future__ import annotations

import json
import os

import pytest

from jaguar_reid import cli, layout
from jaguar_reid.config import load_config
from jaguar_reid.data.csv_tables import DataError
from jaguar_reid.io_utils import DEBUG_ENV, user_message
from tests.helpers import TINY_ARGS, base_args, fake_experiment, make_data


def _one_line(step: str, args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.run_step(step, args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def test_an_output_dir_that_is_a_file_is_named(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [*base_args(data, tmp_path), f"output_dir={blocker}", f"folds.file={blocker}/f.csv"]
    err = _one_line("folds", args, capsys)
    assert str(blocker) in err and "not a directory" in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(OSError):  # the error itself, with its traceback
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        cli.run_step("folds", [*base_args(make_data(tmp_path / "data"), tmp_path),
                               f"folds.file={blocker}/f.csv"])


def test_an_error_raised_in_a_loader_worker_is_its_own_line():
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                        "jaguar_reid.data.csv_tables.DataError: a.png: empty file (0 bytes)\n")
    assert user_message(wrapped) == "a.png: empty file (0 bytes)"
    missing = FileNotFoundError(2, os.strerror(2), "/data/x.csv")
    assert user_message(missing) == "[Errno 2] No such file or directory: '/data/x.csv'"


def test_a_saved_choice_with_an_unknown_key_is_named(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    args = [*TINY_ARGS, *base_args(data, tmp_path, "exp=e", "submit.folds=0")]
    fake_experiment(args)
    choice = layout.work_dir(load_config(args)) / layout.POST_CHOICE
    choice.parent.mkdir(parents=True, exist_ok=True)
    choice.write_text(json.dumps({"settings": {"qe_k": 1, "rerank_mode": "fast"}}))
    err = _one_line("submit", args, capsys)
    assert f"{choice}: unknown post-processing key 'rerank_mode'" in err
