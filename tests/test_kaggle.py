"""The Kaggle notebooks (kaggle/). Both are valid nbformat 4 whose code compiles. Each is run
as Kaggle runs it, its settings cell filled in, in a fresh Python with the network refused and
every dataset it reads (code, models, data, weights, an earlier session's output) read-only
and checked unchanged, file by file: the submission notebook writes the bytes submit.py
writes from the original experiment; the training notebook resumes an earlier session's
output, then tunes and exports."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jaguar_reid import layout, submission, train
from jaguar_reid.config import load_config
from tests.helpers import REPO, TINY_ARGS, make_data, set_writable, snapshot

KAGGLE = REPO / "kaggle"
NOTEBOOKS = ("submit.ipynb", "train.ipynb")
SETTINGS_MARKER = "# --- settings: the only cell to edit ---"
# What kaggle/README.md puts into the code dataset; the caches a checkout gathers stay out.
CODE_FILES = ("src", "configs", "folds", "kaggle", "pyproject.toml", "submit.py", "train.sh")
CODE_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _nbtools():
    spec = importlib.util.spec_from_file_location("nbtools", KAGGLE / "nbtools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(name: str) -> list[dict]:
    return json.loads((KAGGLE / name).read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


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
        source = _source(cell)
        # Plain Python only: shell escapes (`!pip`) would not run under the offline test.
        assert not re.search(r"^\s*[!%]", source, re.MULTILINE), f"{name}: code cell {i}"
        compile(source, f"{name}[{i}]", "exec")
        assert cell["outputs"] == [] and cell["execution_count"] is None  # committed clean
    # The settings are the first code cell, found by its marker, and the only one marked.
    assert _source(code[0]).startswith(SETTINGS_MARKER)
    assert sum(SETTINGS_MARKER in _source(cell) for cell in code) == 1


def test_requirements_read_from_pyproject_and_compared(monkeypatch):
    nbtools = _nbtools()
    reqs = nbtools.requirements(REPO)
    assert any(r.startswith("timm>=") for r in reqs) and all(isinstance(r, str) for r in reqs)
    assert nbtools.unsatisfied(reqs) == []  # this environment runs the package
    monkeypatch.setattr(nbtools, "tomllib", None)  # Python 3.10 reads the list without it
    assert nbtools.requirements(REPO) == reqs
    assert nbtools.check("numpy>=1.0,<999")[1] == "ok"
    assert nbtools.check("numpy>=999")[1] == "old"
    assert nbtools.check("numpy>=1.0,<1.1")[1] == "new"  # used as it is, not replaced
    assert nbtools.check("no-such-package-for-kaggle>=1") == (None, "missing")
    assert nbtools.check('numpy>=999; python_version < "3"')[1] == "ok"  # not for this Python
    assert nbtools.unsatisfied(["numpy>=999", "numpy<1", "no-such-package-for-kaggle"]) == [
        "numpy>=999", "no-such-package-for-kaggle"]
    # The comparison where Kaggle has no `packaging`.
    monkeypatch.setattr(nbtools, "SpecifierSet", None)
    assert nbtools.check("numpy>=999")[1] == "old" and nbtools.check("numpy<1")[1] == "new"
    assert nbtools.satisfies("2.5.1+cu121", ">=2.4") and not nbtools.satisfies("2.3.9", ">=2.4")
    assert nbtools.satisfies("1.0.10", ">=1.0.9,<2") and not nbtools.satisfies("2.0", ">=1,<2")
    assert nbtools.satisfies("1.4.2", "~=1.4") and not nbtools.satisfies("2.0", "~=1.4")


def test_run_stops_at_the_deadline():
    nbtools = _nbtools()
    start = time.monotonic()
    done = nbtools.run([sys.executable, "-c", "import time; time.sleep(60)"], REPO,
                       deadline=time.time() + 0.5)
    assert done is False and time.monotonic() - start < 30
    assert nbtools.run([sys.executable, "-c", "print('hello')"], REPO) is True
    with pytest.raises(subprocess.CalledProcessError):
        nbtools.run([sys.executable, "-c", "raise SystemExit(3)"], REPO)


# --------------------------------------------------------------------------- running them

# A sitecustomize.py on PYTHONPATH: every Python process of the run (the notebook and the
# submit.py it starts) refuses connections and name lookups, as Kaggle's offline sessions do,
# and logs at exit which jaguar_reid it imported.
GUARD = '''
import atexit
import os
import socket
import sys


def _refuse(*args, **kwargs):
    raise OSError("network disabled by tests/test_kaggle.py")


def _local_only(connect):
    def guarded(self, address):
        if self.family == getattr(socket, "AF_UNIX", None):  # pipes between local processes
            return connect(self, address)
        return _refuse()
    return guarded


socket.socket.connect = _local_only(socket.socket.connect)
socket.socket.connect_ex = _local_only(socket.socket.connect_ex)
socket.create_connection = _refuse
socket.getaddrinfo = _refuse


@atexit.register
def _record():
    package = sys.modules.get("jaguar_reid")
    with open(os.environ["KAGGLE_TEST_LOG"], "a") as log:
        log.write(f"{os.getpid()} {getattr(package, '__file__', None)}\\n")
'''

# Run before the notebook's cells: a connection to a port that is listening (the test's) must
# be refused, so the guard, not an absent server, is what stops it; and a name lookup.
PROOF = '''
import os
import socket

_port = int(os.environ["KAGGLE_TEST_PORT"])
for _attempt in (lambda: socket.socket().connect(("127.0.0.1", _port)),
                 lambda: socket.create_connection(("127.0.0.1", _port), timeout=5),
                 lambda: socket.getaddrinfo("pypi.org", 443)):
    try:
        _attempt()
    except OSError as exc:
        assert "network disabled" in str(exc), exc
    else:
        raise SystemExit("the network guard let a connection through")
'''


def _with_settings(source: str, values: dict[str, object]) -> str:
    """The settings cell with each `NAME = ...` line replaced; every name must be there."""
    lines = source.splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if re.match(rf"{name}\s*=", line)]
        assert len(hits) == 1, f"the settings cell has no single {name} = line"
        lines[hits[0]] = f"{name} = {value!r}"
    return "\n".join(lines)


def _notebook_script(name: str, settings: dict[str, object]) -> str:
    cells = [_source(c) for c in _cells(name) if c["cell_type"] == "code"]
    cells[0] = _with_settings(cells[0], settings)
    return "\n\n".join([PROOF, *cells]) + "\n"


def _code_dataset(dest: Path) -> Path:
    """The code dataset: this checkout's files the notebooks use, no caches."""
    for name in CODE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=CODE_IGNORED)
        else:
            shutil.copy2(REPO / name, dest / name)
    return dest


def _run_notebook(name: str, settings: dict[str, object], inputs: Path,
                  tmp_path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Run a notebook's code cells (`settings` in its first) as one script in a fresh Python,
    the network refused, in the working folder `settings["WORK"]`, with every dataset under
    `inputs` read-only; checks that nothing under `inputs` changed and that each Python
    process took jaguar_reid from the code dataset. Returns the output and, per process of the
    run, its pid and the jaguar_reid it imported."""
    guard, log = tmp_path / "guard", tmp_path / f"{name}.log"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    script = tmp_path / f"{name}.py"
    script.write_text(_notebook_script(name, settings))
    Path(settings["WORK"]).mkdir(parents=True, exist_ok=True)
    # The notebook itself must keep bytecode out of the code dataset.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    set_writable(inputs, False)
    before = snapshot(inputs, folders=True)
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:  # a port that would answer
            env.update(PYTHONPATH=str(guard), KAGGLE_TEST_LOG=str(log),
                       KAGGLE_TEST_PORT=str(server.getsockname()[1]))
            result = subprocess.run([sys.executable, str(script)], cwd=settings["WORK"],
                                    env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        after = snapshot(inputs, folders=True)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"written into a read-only dataset: {changed[:10]}"
    finally:
        set_writable(inputs, True)
    runs = [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()]
    code = Path(settings["CODE"]) / "src"
    assert all(Path(f).is_relative_to(code) for _, f in runs if f != "None")
    return result.stdout, runs


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
    _code_dataset(code)
    _export(trained, exp, models)
    shutil.copytree(demo_dir, data)
    working = tmp_path / "working"
    out, runs = _run_notebook("submit.ipynb", {
        "CODE": str(code), "MODELS": str(models), "EXP": exp, "DATA": str(data), "WHEELS": "",
        "WORK": str(working), "EXTRA": extra}, inputs, tmp_path)
    assert len({pid for pid, _ in runs}) >= 2  # the notebook's and submit.py's, both guarded
    assert any(f != "None" for _, f in runs)

    written = working / "submission.csv"
    sub, sample = pd.read_csv(written), pd.read_csv(data / "sample_submission.csv")
    assert sub["row_id"].tolist() == sample["row_id"].tolist()
    assert np.isfinite(sub["similarity"].to_numpy()).all()
    assert written.read_bytes() == direct.read_bytes()
    assert "rows, as in sample_submission.csv" in out


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_training_notebook_resumes_an_earlier_session_and_exports(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    inputs = tmp_path / "input"
    code = _code_dataset(inputs / "jaguar-reid-code")
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
    out, _ = _run_notebook("train.ipynb", {
        "CODE": str(code), "DATA": str(data), "WEIGHTS": str(weights), "PREVIOUS": str(earlier),
        "WHEELS": "", "WORK": str(working), "EXP": exp, "CONFIG": config, "FOLDS": "0..1",
        "HOURS": 1.0, "EXTRA": extra}, inputs, tmp_path)
    assert "fold 0: already finished" in out and "fold 1: resuming after epoch 1" in out
    assert (working / "output" / "folds.csv").is_file()  # the split travels with the output
    output = working / "output" / exp
    assert layout.finished_folds(output) == [0, 1]
    assert (output / layout.POST_CHOICE).is_file()
    exported = working / "export" / exp
    assert layout.finished_folds(exported) == [0, 1] and (exported / layout.MANIFEST).is_file()
    assert f"models for submit.ipynb: {exported}" in out
