"""The Kaggle notebooks (kaggle/). Both are valid nbformat 4 whose code compiles. Each is run
as Kaggle runs it, its settings cell filled in, in a fresh Python with the network refused and
every dataset it reads (code, models, data, weights, an earlier session's output) read-only
and checked unchanged, file by file: the submission notebook writes the bytes submit.py
writes from the original experiment; the training notebook resumes an earlier session's
output, then tunes and exports."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jaguar_reid import layout, submission, train
from jaguar_reid.config import load_config
from tests.helpers import REPO, TINY_ARGS, make_data
from tests.notebooks import (
    KAGGLE,
    NOTEBOOKS,
    SETTINGS_MARKER,
    cells,
    code_dataset,
    nbtools,
    run_notebook,
    source,
    with_settings,
)

# --------------------------------------------------------------------------- cheap checks

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_nbformat4_and_its_code_compiles(name):
    nb = json.loads((KAGGLE / name).read_text())
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in nb["cells"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert {cell["cell_type"] for cell in nb["cells"]} <= {"code", "markdown"}
    for i, cell in enumerate(code):
        text = source(cell)
        # Plain Python only: shell escapes (`!pip`) would not run under the offline test.
        assert not re.search(r"^\s*[!%]", text, re.MULTILINE), f"{name}: code cell {i}"
        compile(text, f"{name}[{i}]", "exec")
        assert cell["outputs"] == [] and cell["execution_count"] is None  # committed clean
    # The settings are the first code cell, found by its marker, and the only one marked.
    assert source(code[0]).startswith(SETTINGS_MARKER)
    assert sum(SETTINGS_MARKER in source(cell) for cell in code) == 1


def test_requirements_read_from_pyproject_and_compared(monkeypatch):
    tools = nbtools()
    reqs = tools.requirements(REPO)
    assert any(r.startswith("timm>=") for r in reqs) and all(isinstance(r, str) for r in reqs)
    assert tools.unsatisfied(reqs) == []  # this environment runs the package
    monkeypatch.setattr(tools, "tomllib", None)  # Python 3.10 reads the list without it
    assert tools.requirements(REPO) == reqs
    assert tools.check("numpy>=1.0,<999")[1] == "ok"
    assert tools.check("numpy>=999")[1] == "old"
    assert tools.check("numpy>=1.0,<1.1")[1] == "new"  # used as it is, not replaced
    assert tools.check("no-such-package-for-kaggle>=1") == (None, "missing")
    assert tools.check('numpy>=999; python_version < "3"')[1] == "ok"  # not for this Python
    assert tools.unsatisfied(["numpy>=999", "numpy<1", "no-such-package-for-kaggle"]) == [
        "numpy>=999", "no-such-package-for-kaggle"]
    # The comparison where Kaggle has no `packaging`.
    monkeypatch.setattr(tools, "SpecifierSet", None)
    assert tools.check("numpy>=999")[1] == "old" and tools.check("numpy<1")[1] == "new"
    assert tools.satisfies("2.5.1+cu121", ">=2.4") and not tools.satisfies("2.3.9", ">=2.4")
    assert tools.satisfies("1.0.10", ">=1.0.9,<2") and not tools.satisfies("2.0", ">=1,<2")
    assert tools.satisfies("1.4.2", "~=1.4") and not tools.satisfies("2.0", "~=1.4")


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A wheel file holding only its METADATA: what the requirement check reads of it."""
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {req}\n" for req in requires)])
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{stem}.dist-info/METADATA", meta)
    return path


def test_a_marker_that_cannot_be_read_is_named_not_a_traceback():
    tools = nbtools()
    assert tools.check('numpy>=1; python_version > "3"')[1] == "ok"
    assert tools.check('numpy>=1; python_version < "3"') == (None, "ok")  # not for us
    with pytest.raises(ValueError, match="numpy>=1; python_versio >> 3.*environment marker"):
        tools.check("numpy>=1; python_versio >> 3")


def test_extras_add_their_requirements_and_an_unknown_one_is_named():
    tools = nbtools()
    base = tools.requirements(REPO)
    assert not any(r.startswith("pytorch-metric-learning") for r in base)  # an extra now
    assert tools.requirements(REPO, ["losses"]) == [*base, "pytorch-metric-learning>=2.9,<3"]
    assert tools.requirements(REPO, ["losses", "faiss"])[-1].startswith("faiss-cpu>=")
    with pytest.raises(SystemExit, match=r"OPTIONAL: no extra 'loss' in .*pyproject.toml; its "
                                         r"extras: losses, tensorboard, onnx"):
        tools.requirements(REPO, ["loss"])
    without_toml = nbtools()
    without_toml.tomllib = None  # Python 3.10 reads the lists by pattern
    for extras in ([], ["losses"], ["onnx", "kornia"]):
        assert without_toml.requirements(REPO, extras) == tools.requirements(REPO, extras)


def test_wheels_to_fetch_are_named_with_the_command_that_downloads_them(tmp_path):
    tools = nbtools()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    needed = ["fake-kaggle-lib>=1.0,<2", "numpy>=999"]
    # Nothing attached: each requirement named, with why.
    assert tools.to_fetch(needed, tools.wheels_in("")) == [
        ("fake-kaggle-lib>=1.0,<2", "not installed"),
        ("numpy>=999", f"{np.__version__} installed, too old")]
    # A wheel of the wrong version does not count; the right one does, and its own
    # requirements are checked: numpy is met here, the other library is not (nor in the
    # folder), the extra's requirement is not wanted.
    _wheel(wheels, "fake-kaggle-lib", "0.9")
    whl = _wheel(wheels, "fake_kaggle.lib", "1.2", ("numpy (>=1)", "fake-kaggle-dep>=3",
                                                    'pytest; extra == "test"'))
    assert tools.wheel_requirements(whl) == ["numpy (>=1)", "fake-kaggle-dep>=3"]
    assert tools.check("numpy (>=1.0)")[1] == "ok"  # the older form of Requires-Dist
    assert tools.check("numpy (>=999)")[1] == "old"
    assert tools.to_fetch(needed[:1], tools.wheels_in(wheels)) == [
        ("fake-kaggle-dep>=3", f"not installed; needed by {whl.name}")]
    # pip's --find-links reads the folder's top level only: a nested wheel is not there.
    nested = wheels / "sub"
    nested.mkdir()
    _wheel(nested, "fake-kaggle-dep", "3.0.1")
    fetch = tools.to_fetch(needed[:1], tools.wheels_in(wheels))
    assert fetch == [("fake-kaggle-dep>=3", f"not installed; needed by {whl.name}")]
    assert (f"WHEELS holds wheels in sub-folders, which pip does not read: set WHEELS to the "
            f"folder that holds them ({nested})") in tools.wheels_message(fetch, wheels)
    _wheel(wheels, "fake-kaggle-dep", "3.0.1")
    assert tools.to_fetch(needed[:1], tools.wheels_in(wheels)) == []

    message = tools.wheels_message(tools.to_fetch(needed, {}), "")
    lines = message.splitlines()
    assert lines[1:3] == ["    fake-kaggle-lib>=1.0,<2    (not installed)",
                          f"    numpy>=999    ({np.__version__} installed, too old)"]
    command = shlex.split(lines[-1])
    version = "{}.{}".format(*sys.version_info[:2])  # this Python's, not a written number
    assert command[:6] == ["pip", "download", "--no-deps", "--python-version", version,
                           "--only-binary=:all:"]
    assert command[-4:] == ["-d", "wheels", "fake-kaggle-lib>=1.0,<2", "numpy>=999"]
    platforms = [command[i + 1] for i, arg in enumerate(command) if arg == "--platform"]
    assert platforms == tools.platform_tags() and platforms[-1].startswith("manylinux")


def test_wheels_for_another_python_and_other_files_are_left_out_with_a_note(tmp_path,
                                                                           monkeypatch, capsys):
    tools = nbtools()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    other = _wheel(wheels, "fake-kaggle-lib", "1.1")
    other = other.rename(wheels / "fake_kaggle_lib-1.1-cp39-cp39-manylinux2014_x86_64.whl")
    (wheels / "notes.whl").write_text("")
    assert tools.wheels_in(wheels) == {}
    out = capsys.readouterr().out
    assert f"note: {other.name} is for another Python or machine than this" in out
    assert "note: notes.whl is not a wheel's file name" in out
    assert tools.to_fetch(["fake-kaggle-lib>=1"], tools.wheels_in(wheels)) == [
        ("fake-kaggle-lib>=1", "not installed")]
    ours = _wheel(wheels, "fake-kaggle-lib", "1.0")
    assert tools.wheels_in(wheels) == {"fake-kaggle-lib": [("1.0", ours)]}
    # Without `packaging` the names are read by pattern, every wheel taken as this Python's.
    monkeypatch.setattr(tools, "sys_tags", None)
    assert tools.wheels_in(wheels) == {"fake-kaggle-lib": [("1.0", ours), ("1.1", other)]}
    assert "note: notes.whl is not a wheel's file name" in capsys.readouterr().out


def test_pins_older_than_the_installed_version_are_not_too_old(monkeypatch):
    tools = nbtools()
    for spec in ("==1.0", "~=1.0", "<=1.0", "<1", "==1.0.*", ">=0.5,<1"):
        assert tools.check(f"numpy{spec}")[1] == "new", spec  # used as is, never downgraded
    for spec in ("==999", "~=999.0", f"!={np.__version__}"):
        assert tools.check(f"numpy{spec}")[1] == "old", spec
    monkeypatch.setattr(tools, "SpecifierSet", None)
    monkeypatch.setattr(tools, "Version", None)
    assert tools.check("numpy==1.0")[1] == "new" and tools.check("numpy~=1.0")[1] == "new"
    assert tools.check("numpy==999")[1] == "old"


def test_optional_given_as_a_string_is_one_extra():
    tools = nbtools()
    assert tools.requirements(REPO, "losses") == tools.requirements(REPO, ["losses"])


def test_a_missing_requirement_stops_before_any_work_naming_its_wheel(tmp_path):
    tools = nbtools()
    code = tmp_path / "code"
    code.mkdir()
    (code / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=1"]\n\n'
        '[project.optional-dependencies]\nextra = ["fake-kaggle-lib>=1.0,<2"]\n')
    tools.install_missing(code)  # met: nothing to do
    with pytest.raises(SystemExit) as stop:
        tools.install_missing(code, "", ["extra"])
    assert "fake-kaggle-lib>=1.0,<2    (not installed)" in str(stop.value)
    assert "pip download --no-deps" in str(stop.value)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with pytest.raises(SystemExit, match=rf"WHEELS \({wheels}\) lacks a wheel"):
        tools.install_missing(code, wheels, ["extra"])


def test_run_stops_at_the_deadline():
    tools = nbtools()
    start = time.monotonic()
    done = tools.run([sys.executable, "-c", "import time; time.sleep(60)"], REPO,
                     deadline=time.time() + 0.5)
    assert done is False and time.monotonic() - start < 30
    assert tools.run([sys.executable, "-c", "print('hello')"], REPO) is True
    # train.sh runs the notebook's own Python, whatever `python` on PATH is.
    assert tools.run(["bash", "-c", f'test "$PYTHON" = {shlex.quote(sys.executable)}'], REPO)
    with pytest.raises(subprocess.CalledProcessError):
        tools.run([sys.executable, "-c", "raise SystemExit(3)"], REPO)


# --------------------------------------------------------------------------- running them

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_settings_paths_are_checked_before_any_work(name, tmp_path):
    """Every path not found is named in one message (CODE's too, before nbtools is imported
    from it); nothing runs, nothing is written."""
    inputs = tmp_path / "input"
    code = code_dataset(inputs / "jaguar-reid-code")
    data = make_data(inputs / "jaguar-re-id")
    wrong = {"DATA": str(inputs / "no-such-data"), "WHEELS": str(inputs / "no-wheels")}
    wrong |= ({"MODELS": str(inputs / "no-models")} if name == "submit.ipynb" else
              {"WEIGHTS": str(inputs / "w" / "model.safetensors"),
               "PREVIOUS": str(inputs / "no-such-session")})
    working = tmp_path / "working"
    run = run_notebook(name, {"CODE": str(code), "WORK": str(working), **wrong}, inputs,
                       tmp_path, ok=False)
    message = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and message.startswith("settings: "), run.stderr[-2000:]
    for setting, path in wrong.items():
        assert f"{setting} = {path!r}: not found" in message
    assert "CODE" not in message and "Traceback" not in run.stderr
    csv = f"{'test' if 'submit' in name else 'train'}.csv"
    assert f"DATA = {wrong['DATA']!r}: not found (a folder holding {csv})" in message
    assert list(working.iterdir()) == []
    # CODE itself, and a data folder without the competition's file.
    run = run_notebook(name, {"CODE": str(inputs / "code"), "DATA": str(data / "train"),
                              "WORK": str(working)}, inputs, tmp_path, ok=False)
    message = run.stderr.strip().splitlines()[-1]
    assert f"CODE = {str(inputs / 'code')!r}: not found (a folder holding pyproject.toml)" \
        in message
    assert f"DATA = {str(data / 'train')!r}: holds no {csv}" in message


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_a_file_where_a_folder_is_expected_and_the_reverse_are_named(name, tmp_path):
    """Each wrong one in one message, before any work; and EXTRA setting what the settings
    set (EXP, FOLDS, MODELS, ...), which would win over them (and over SMOKE)."""
    inputs = tmp_path / "input"
    code = code_dataset(inputs / "jaguar-reid-code")
    data = make_data(inputs / "jaguar-re-id")
    a_file = data / ("test.csv" if name == "submit.ipynb" else "train.csv")
    wrong = {"WHEELS": (str(a_file), "a file, not a folder")}
    if name == "submit.ipynb":
        wrong |= {"MODELS": (str(a_file), "a file, not a folder")}
    else:
        wrong |= {"WEIGHTS": (str(data), "a folder, not a file"),
                  "PREVIOUS": (str(a_file), "a file, not a folder")}
    settings = {"CODE": str(code), "DATA": str(data), "WORK": str(tmp_path / "working"),
                **{key: path for key, (path, _) in wrong.items()}}
    settings["EXTRA"] = (["train.epochs=2", "exp=real", " fold = 0..4"] if name == "train.ipynb"
                         else ["submit.folds=0", "exp=real", "output_dir = x"])
    run = run_notebook(name, settings, inputs, tmp_path, ok=False)
    message = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and message.startswith("settings: "), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    for key, (path, why) in wrong.items():
        assert f"{key} = {path!r}: {why}" in message
    assert "CODE = " not in message and "DATA = " not in message
    if name == "train.ipynb":
        assert "EXTRA sets 'exp=real', ' fold = 0..4': set EXP and FOLDS instead" in message
    else:
        assert ("EXTRA sets 'exp=real', 'output_dir = x': set EXP, MODELS, DATA and WORK "
                "instead") in message


def test_smoke_settings_come_last_and_the_cell_runs_again_the_same(tmp_path):
    """SMOKE's train.epochs=1 after EXTRA's; the settings cell's EXP is not renamed, so a
    second run of the environment cell trains EXP_smoke again, not EXP_smoke_smoke."""
    inputs = tmp_path / "input"
    code = code_dataset(inputs / "jaguar-reid-code")
    data = make_data(inputs / "jaguar-re-id")
    weights = inputs / "w.safetensors"
    weights.write_bytes(b"")
    settings = {"CODE": str(code), "DATA": str(data), "WEIGHTS": str(weights), "EXP": "e",
                "SMOKE": True, "EXTRA": ["train.epochs=20"], "WORK": str(tmp_path)}
    settings_cell, env_cell = [source(c) for c in cells("train.ipynb")
                               if c["cell_type"] == "code"][:2]
    script = "\n\n".join([with_settings(settings_cell, settings), env_cell, env_cell,
                          "print('RUN', RUN_EXP, RUN_FOLDS, RUN_EXTRA, EXP)\n"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("SMOKE: fold 0 for one epoch, as e_smoke") == 2
    assert done.stdout.splitlines()[-1] == \
        "RUN e_smoke 0 ['train.epochs=20', 'train.epochs=1'] e"


def _export(args: list[str], exp: str, out: Path) -> None:
    """The models dataset: `python -m jaguar_reid.export`'s folder, `out/<exp>/`."""
    from jaguar_reid import export

    export.main([*args, f"out={out}"])
    assert (out / exp / layout.MANIFEST).is_file()


@pytest.mark.slow
def test_submission_notebook_offline_from_read_only_datasets(demo_dir, tmp_path):
    exp = "kaggle"
    trained = [*TINY_ARGS, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
               f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=2", f"exp={exp}"]
    train.main([*trained, "fold=0"])
    # What the notebook's EXTRA passes, and the direct submission too: the tiny run's fold, on
    # the CPU; no plain floor (it needs starting weights the tiny run never had), no report
    # (test_moved_runs builds one from a read-only model folder).
    extra = ["submit.folds=0", "device=cpu", "data.num_workers=0", "cache.workers=1",
             "floor.enabled=false", "report.enabled=false"]
    direct = tmp_path / "direct.csv"
    submission.main([f"exp={exp}", f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
                     f"submit.file={direct}", *extra])

    # The three datasets: the code, the models, the competition data.
    inputs = tmp_path / "input"
    code, models, data = inputs / "jaguar-reid-code", inputs / "models", inputs / "jaguar-re-id"
    code_dataset(code)
    _export(trained, exp, models)
    shutil.copytree(demo_dir, data)
    working = tmp_path / "working"
    run = run_notebook("submit.ipynb", {
        "CODE": str(code), "MODELS": str(models), "EXP": exp, "DATA": str(data), "WHEELS": "",
        "WORK": str(working), "EXTRA": extra}, inputs, tmp_path)
    assert len({pid for pid, _ in run.processes}) >= 2  # the notebook's and submit.py's
    assert any(f != "None" for _, f in run.processes)

    written = working / "submission.csv"
    sub, sample = pd.read_csv(written), pd.read_csv(data / "sample_submission.csv")
    assert sub["row_id"].tolist() == sample["row_id"].tolist()
    assert np.isfinite(sub["similarity"].to_numpy()).all()
    assert written.read_bytes() == direct.read_bytes()
    assert "rows, as in sample_submission.csv" in run.stdout


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_training_notebook_resumes_an_earlier_session_and_exports(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    inputs = tmp_path / "input"
    code = code_dataset(inputs / "jaguar-reid-code")
    data = make_data(inputs / "jaguar-re-id")  # 12 tiny images: this test is about sessions
    weights = inputs / "weights" / "resnet18.safetensors"  # the starting weights, a dataset
    weights.parent.mkdir()
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0, global_pool="")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    exp, config = "kaggle", "configs/demo.yaml"
    extra = [a for a in TINY_ARGS if not a.startswith("config=")] + [
        "folds.n_folds=2", "train.epochs=2", "train.batch_size=4", "tune.per_identity=0",
        "tune.views=[flip]", "tune.qe_k=[1]", "tune.k1=[5]", "tune.k2=[1]", "tune.lambda=[0.3]",
        "tune.blend=[0.5]", "tune.proto_weight=[0.25]", "tune.proto_scale=[10.0]"]

    # The earlier session, as its output was saved: fold 0 finished, fold 1 stopped after its
    # first epoch (checkpoint), the folds file and the cache beside them.
    earlier = inputs / "jaguar-reid-train" / "output"
    session = [f"config={config}", f"exp={exp}", f"data.dir={data}", f"output_dir={earlier}",
               f"folds.file={earlier / 'folds.csv'}", f"model.weights={weights}", *extra]
    train.main([*session, "fold=0"])

    def stop(fold, epoch):
        if epoch == 1:
            raise Interrupted
    with pytest.raises(Interrupted):
        train.run(load_config([*session, "fold=1"]), after_epoch=stop)
    assert (layout.fold_dir(earlier / exp, 1) / layout.CHECKPOINT).is_file()

    working = tmp_path / "working"
    out = run_notebook("train.ipynb", {
        "CODE": str(code), "DATA": str(data), "WEIGHTS": str(weights), "PREVIOUS": str(earlier),
        "WHEELS": "", "WORK": str(working), "EXP": exp, "CONFIG": config, "FOLDS": "0..1",
        "HOURS": 1.0, "EXTRA": extra}, inputs, tmp_path).stdout
    assert "fold 0: already finished" in out and "fold 1: resuming after epoch 1" in out
    assert (working / "output" / "folds.csv").is_file()  # the split travels with the output
    output = working / "output" / exp
    assert layout.finished_folds(output) == [0, 1]
    assert (output / layout.POST_CHOICE).is_file()
    exported = working / "export" / exp
    assert layout.finished_folds(exported) == [0, 1] and (exported / layout.MANIFEST).is_file()
    assert f"models for submit.ipynb: {exported}" in out


@pytest.mark.slow
def test_training_notebook_smoke_trains_fold_0_for_one_epoch_then_tunes_and_exports(tmp_path):
    """SMOKE = True: whatever FOLDS and EXTRA's train.epochs say, fold 0 for one epoch, under
    EXP_smoke (the real experiment's folder untouched), then tuning and the export."""
    import timm
    import torch
    from safetensors.torch import save_file

    inputs = tmp_path / "input"
    code = code_dataset(inputs / "jaguar-reid-code")
    data = make_data(inputs / "jaguar-re-id")
    weights = inputs / "weights" / "resnet18.safetensors"
    weights.parent.mkdir()
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0, global_pool="")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    extra = [a for a in TINY_ARGS if not a.startswith("config=")] + [
        "folds.n_folds=2", "train.epochs=3", "train.batch_size=4", "tune.per_identity=0",
        "tune.views=[flip]", "tune.qe_k=[1]", "tune.k1=[5]", "tune.k2=[1]", "tune.lambda=[0.3]",
        "tune.blend=[0.5]", "tune.proto_weight=[0.25]", "tune.proto_scale=[10.0]"]
    working = tmp_path / "working"
    out = run_notebook("train.ipynb", {
        "CODE": str(code), "DATA": str(data), "WEIGHTS": str(weights), "PREVIOUS": "",
        "WHEELS": "", "WORK": str(working), "EXP": "kaggle", "CONFIG": "configs/demo.yaml",
        "FOLDS": "0..1", "HOURS": 1.0, "SMOKE": True, "EXTRA": extra}, inputs, tmp_path).stdout
    assert "SMOKE: fold 0 for one epoch, as kaggle_smoke" in out
    output = working / "output" / "kaggle_smoke"
    assert layout.finished_folds(output) == [0] and not (working / "output" / "kaggle").exists()
    log = pd.read_csv(layout.fold_dir(output, 0) / layout.TRAIN_LOG)
    assert log["epoch"].max() == 1  # one epoch trained (row 0: before training)
    assert (output / layout.POST_CHOICE).is_file()
    exported = working / "export" / "kaggle_smoke"
    assert layout.finished_folds(exported) == [0] and (exported / layout.MANIFEST).is_file()
    assert f"models for submit.ipynb: {exported}" in out


# --------------------------------------------------------------------------- replica.sh

# A stand-in for Python 3.12 and its venv: records each call, answers the version check,
# `-m venv DIR` makes DIR/bin/python (itself), a `pip install` of a folder lists its top level,
# `pip list` answers what image.txt pins (STUB_FREEZE's lines instead, where set; exit
# STUB_LIST_RC).
STUB_PYTHON = r'''#!/bin/bash
echo "$*" >> "$STUB_LOG"
if [ "$1" = -I ]; then shift; fi
case "$1" in
    -c) echo "${STUB_VERSION:-3.12}" ;;
    -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
        if [ "$2 $3" = "pip list" ]; then
            if [ -n "${STUB_FREEZE:-}" ]; then printf '%s\n' "$STUB_FREEZE"
            else awk '!/^#/ && NF >= 2 && $1 != "python" { print $1 "==" $2 }' "$STUB_IMAGE"
            fi
            exit "${STUB_LIST_RC:-0}"
        fi
        if [ "$2 $3" = "pip install" ]; then
            for last; do :; done
            if [ -d "$last" ]; then ls -A "$last" > "$STUB_LOG.installed"; fi
        fi ;;
esac
'''


def _stub(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB_PYTHON)
    path.chmod(0o755)
    return path


def _df_says(folder: Path, free_kb: int | None) -> Path:
    """A `df` on PATH that reports free_kb kilobytes free (fails when None), for every folder
    asked: the disk check, whatever this machine's disk holds."""
    folder.mkdir(parents=True, exist_ok=True)
    said = "echo 'df: no file systems processed' >&2; exit 1" if free_kb is None else \
        f"echo '  Avail'; echo '{free_kb}'"
    (folder / "df").write_text(f"#!/bin/bash\n{said}\n")
    (folder / "df").chmod(0o755)
    return folder


def _replica(tmp_path: Path, env: dict[str, str], free_kb: int | None = 100 << 20,
             **popen) -> subprocess.Popen:
    shim = _df_says(tmp_path / "df-shim", free_kb)
    # A stub Python unless the test names one: a rebuild nobody expected never builds for real.
    python = _stub(tmp_path / "default-py312" / "python3.12")
    env = {**os.environ, "KAGGLE_REPLICA_PYTHON": str(python),
           "KAGGLE_REPLICA_DIR": str(tmp_path / "replica"),
           "STUB_LOG": str(tmp_path / "calls.log"), "STUB_IMAGE": str(KAGGLE / "image.txt"),
           "PATH": f"{shim}:{os.environ['PATH']}", **env}
    return subprocess.Popen(["bash", str(KAGGLE / "replica.sh")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _stamped_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "replica" / "venv"
    (venv / "bin").mkdir(parents=True)
    digest = hashlib.sha256((KAGGLE / "image.txt").read_bytes()).hexdigest()
    (venv / ".image-sha256").write_text(digest + "\n")
    return venv


def test_replica_refuses_a_named_python_that_is_missing_or_not_kaggles(tmp_path):
    for python, why in [(str(tmp_path / "no" / "python3.12"), "not found"),
                        (str(_stub(tmp_path / "py311")), "Python 3.11, not 3.12")]:
        done = _replica(tmp_path, {"KAGGLE_REPLICA_PYTHON": python, "STUB_VERSION": "3.11"})
        out = done.communicate(timeout=60)[0]
        assert done.returncode == 2, out
        assert out.strip() == f"replica: KAGGLE_REPLICA_PYTHON={python}: {why}" + (
            " (kaggle/image.txt)" if "3.11" in why else "")
        assert not (tmp_path / "replica" / "venv").exists()


def test_replica_rebuilds_a_venv_whose_python_is_gone_and_installs_a_clean_copy(tmp_path):
    venv = _stamped_venv(tmp_path)
    (venv / "bin" / "python").symlink_to(tmp_path / "gone" / "python3.12")
    python = _stub(tmp_path / "py312" / "python3.12")
    done = _replica(tmp_path, {"KAGGLE_REPLICA_PYTHON": str(python)})
    out = done.communicate(timeout=120)[0]
    assert done.returncode == 0, out
    assert "no longer runs (its base Python moved or went): rebuilding" in out
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert f"-m venv {venv}" in calls and (venv / ".image-sha256").is_file()
    # The package from a copy of the checkout's files, without build/ or caches.
    install = next(c for c in calls if c.endswith("/checkout"))
    assert install.split()[-1] != "." and "--no-deps" in install
    listed = (tmp_path / "calls.log.installed").read_text().split()
    assert {"pyproject.toml", "src", "configs"} <= set(listed)
    assert not {"build", ".venv", ".git"} & set(listed)  # ignored or not a file of it
    assert not (tmp_path / "replica" / "checkout").exists()  # removed after the install


def test_replica_runs_take_turns(tmp_path):
    venv = _stamped_venv(tmp_path)
    _stub(venv / "bin" / "python")
    with open(tmp_path / "replica" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run holds the environment
        waiting = _replica(tmp_path, {})
        time.sleep(2)
        assert waiting.poll() is None  # it waits rather than deleting or filling the venv
        assert not (tmp_path / "calls.log").exists() or \
            "pip install" not in (tmp_path / "calls.log").read_text()
    out = waiting.communicate(timeout=120)[0]
    assert waiting.returncode == 0, out
    assert out.startswith(f"replica: waiting for another run on {tmp_path / 'replica'}")
    assert "replica: done" in out


def _pins() -> list[str]:
    return [f"{row.split()[0]}=={row.split()[1]}" for row in
            (KAGGLE / "image.txt").read_text().splitlines()
            if row.strip() and not row.startswith("#") and row.split()[0] != "python"]


def test_replica_reuses_a_venv_that_holds_the_pins_in_any_spelling(tmp_path):
    venv = _stamped_venv(tmp_path)
    _stub(venv / "bin" / "python")
    # pip spells names its own way (PyYAML, scikit_learn), and a verbose pip adds each one's
    # location after the version: the same distributions.
    freeze = [p.upper().replace("-", "_") if p.startswith("scikit") else p for p in _pins()]
    freeze = [f"{p} ({venv}/lib/python3.12/site-packages)" for p in freeze]
    done = _replica(tmp_path, {"STUB_FREEZE": "\n".join(freeze)})
    out = done.communicate(timeout=120)[0]
    assert done.returncode == 0, out
    assert "rebuilding" not in out and "building" not in out
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert "-I -m pip list --format=freeze --disable-pip-version-check --exclude jaguar-reid" \
        in calls  # isolated: PYTHONPATH cannot add another environment's packages
    assert not any(" venv " in c for c in calls)


@pytest.mark.parametrize("drift, said", [
    ("gained", "has pytorch-metric-learning==2.9.0, lacks {tqdm}"),
    ("many", "lacks {first}, lacks {second}, lacks {third}, ..."),
    ("pip fails", "its pip list failed"),
])
def test_replica_rebuilds_a_venv_that_drifted_and_says_how(tmp_path, drift, said):
    venv = _stamped_venv(tmp_path)
    _stub(venv / "bin" / "python")
    pins = _pins()
    tqdm = next(p for p in pins if p.startswith("tqdm=="))
    gained = [p for p in pins if p != tqdm] + ["pytorch_metric_learning==2.9.0"]
    in_order = sorted(p.lower() for p in pins)  # canonical spelling: lower case
    freeze, rc = {"gained": (gained, 0), "many": (in_order[4:], 0), "pip fails": (pins, 1)}[drift]
    first, second, third = in_order[:3]
    done = _replica(tmp_path, {"STUB_FREEZE": "\n".join(freeze), "STUB_LIST_RC": str(rc)})
    out = done.communicate(timeout=120)[0]
    assert done.returncode == 0, out
    said = said.format(tqdm=tqdm, first=first, second=second, third=third)
    assert (f"replica: {venv} no longer holds exactly kaggle/image.txt ({said}): rebuilding"
            in out.splitlines())
    assert f"-m venv {venv}" in (tmp_path / "calls.log").read_text().splitlines()


def test_replica_refuses_to_build_on_a_disk_without_room(tmp_path):
    done = _replica(tmp_path, {}, free_kb=3 << 20)
    out = done.communicate(timeout=60)[0]
    assert done.returncode == 2, out
    assert out.strip() == (f"replica: building {tmp_path / 'replica' / 'venv'} needs about 12 GB "
                           "free on its disk; it has 3 GB: free some, or set KAGGLE_REPLICA_DIR "
                           "to another disk")
    assert not (tmp_path / "replica" / "venv").exists()
    calls = (tmp_path / "calls.log").read_text()  # the version check alone
    assert "-m venv" not in calls and "pip install" not in calls


def test_replica_counts_the_old_environments_space_and_builds_when_df_cannot_tell(tmp_path):
    venv = _stamped_venv(tmp_path)  # an old environment of 1 MB, stamped for another image
    (venv / ".image-sha256").write_text("an older image.txt\n")
    (venv / "bin" / "ballast").write_bytes(b"x" * (1 << 20))
    done = _replica(tmp_path, {}, free_kb=(12 << 20) - 512)  # 12 GB with it, not without
    out = done.communicate(timeout=120)[0]
    assert done.returncode == 0 and "replica: done" in out, out
    (venv / ".image-sha256").write_text("an older image.txt\n")
    done = _replica(tmp_path, {}, free_kb=None)
    out = done.communicate(timeout=120)[0]
    assert done.returncode == 0, out
    assert (f"replica: df cannot tell the free space on {tmp_path / 'replica'} or "
            f"{os.environ.get('TMPDIR', '/tmp')}; building regardless") in out.splitlines()
