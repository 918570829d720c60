"""Both notebooks in a replica of Kaggle's Python: kaggle/replica.sh builds a virtual
environment with Kaggle's Python version and exactly the versions its image ships
(kaggle/image.txt), installs this package with --no-deps and runs this file there with
KAGGLE_REPLICA=1; anywhere else it is skipped. Each notebook runs as tests/test_kaggle.py runs
it (a fresh Python, every process refusing the network, every dataset read-only and checked
unchanged), but with Kaggle's versions and nothing more:

- the submission notebook, from an exported experiment, writes the bytes submit.py writes
  from the original experiment (both in this Python: only the export differs);
- the training notebook's SMOKE setting trains fold 0 for one epoch, tunes and exports;
- an extra the image lacks (`losses`: pytorch-metric-learning) is named with the one
  `pip download` command that fetches its wheel; that command, run as printed (the one step
  with network), gives the wheel that then installs offline, and the check passes.

The output (`pytest -s`, as replica.sh runs it) shows each step for the record."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import TINY_ARGS
from tests.notebooks import KAGGLE, code_dataset, run_notebook

pytestmark = pytest.mark.skipif(os.environ.get("KAGGLE_REPLICA") != "1",
                                reason="runs in Kaggle's Python only: bash kaggle/replica.sh")

EXP = "kaggle"
# The tiny model on the CPU, and a small tuning grid: this is about the environment.
TINY = [a for a in TINY_ARGS if not a.startswith("config=")] + [
    "tune.per_identity=0", "tune.views=[flip]", "tune.qe_k=[1]", "tune.k1=[5]", "tune.k2=[1]",
    "tune.lambda=[0.3]", "tune.blend=[0.5]", "tune.proto_weight=[0.25]",
    "tune.proto_scale=[10.0]"]


def _section(title: str, text: str = "") -> None:
    print(f"\n===== {title}\n{text}".rstrip(), flush=True)


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _image() -> list[tuple[str, str, str]]:
    """kaggle/image.txt: (package, version, source) per line."""
    rows = []
    for line in (KAGGLE / "image.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version, *source = line.split()
            rows.append((name, version, " ".join(source)))
    return rows


def test_this_python_is_kaggles():
    """Kaggle's major.minor Python; every distribution at the image's version, and nothing
    else but this package."""
    rows = _image()
    pins = {_canonical(name): version for name, version, _ in rows}
    python = pins.pop("python")
    assert "{}.{}".format(*sys.version_info[:2]) == python.rsplit(".", 1)[0]
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    assert installed.pop("jaguar-reid") == metadata.version("jaguar-reid")
    assert installed == pins, "the replica differs from kaggle/image.txt: delete its venv"
    _section("the replica's versions (kaggle/image.txt; C: Colab's pip-freeze.gpu.txt, "
             "K: Kaggle's Dockerfile.tmpl)",
             "\n".join(f"{n:<26}{v:<14}{s}" for n, v, s in rows)
             + f"\nthis Python: {sys.version.split()[0]}, torch {_torch_build()}")


def _torch_build() -> str:
    import torch

    return f"{torch.__version__} (CUDA {torch.version.cuda})"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_dir) -> Path:
    """The datasets: the code, the competition data (the synthetic demo)."""
    root = tmp_path_factory.mktemp("kaggle") / "input"
    code_dataset(root / "jaguar-reid-code")
    shutil.copytree(demo_dir, root / "jaguar-re-id")
    return root


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_submission_notebook_writes_submit_pys_bytes_from_the_export(inputs, tmp_path):
    from jaguar_reid import export, layout, submission, train

    data = inputs / "jaguar-re-id"
    trained = [*TINY, "config=configs/demo.yaml", f"data.dir={data}",
               f"output_dir={tmp_path / 'out'}", f"folds.file={tmp_path / 'folds.csv'}",
               "folds.n_folds=2", f"exp={EXP}"]
    train.main([*trained, "fold=0"])
    extra = ["submit.folds=0", "device=cpu", "data.num_workers=0", "cache.workers=1",
             "floor.enabled=false", "report.enabled=false"]
    direct = tmp_path / "direct.csv"
    submission.main([f"exp={EXP}", f"data.dir={data}", f"output_dir={tmp_path / 'out'}",
                     f"submit.file={direct}", *extra])
    models = inputs / "models"
    export.main([*trained, f"out={models}"])
    assert (models / EXP / layout.MANIFEST).is_file()

    working = tmp_path / "working"
    run = run_notebook("submit.ipynb", {
        "CODE": str(inputs / "jaguar-reid-code"), "MODELS": str(models), "EXP": EXP,
        "DATA": str(data), "WHEELS": "", "OPTIONAL": [], "WORK": str(working),
        "EXTRA": extra}, inputs, tmp_path)
    written = working / "submission.csv"
    assert written.read_bytes() == direct.read_bytes()
    assert "every requirement is met: nothing to install" in run.stdout
    rows = len(pd.read_csv(written))
    _section("submit.ipynb, offline, from the exported experiment", run.stdout)
    _section("the submission", f"submit.ipynb (export):      {_sha256(written)}  {rows} rows\n"
             f"submit.py (original exp.):  {_sha256(direct)}  byte-identical: "
             f"{written.read_bytes() == direct.read_bytes()}")


def _weights(folder: Path) -> Path:
    """The training notebook's starting weights: a tiny timm backbone, as a dataset."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "resnet18.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        backbone = timm.create_model("resnet18", num_classes=0, global_pool="")
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path


def _training(inputs: Path, working: Path, **settings: object) -> dict[str, object]:
    return {"CODE": str(inputs / "jaguar-reid-code"), "DATA": str(inputs / "jaguar-re-id"),
            "WEIGHTS": str(_weights(inputs / "weights")), "PREVIOUS": "", "WHEELS": "",
            "OPTIONAL": [], "WORK": str(working), "EXP": EXP, "CONFIG": "configs/demo.yaml",
            "FOLDS": "0..4", "HOURS": 1.0, "SMOKE": True,
            "EXTRA": [*TINY, "train.epochs=3"], **settings}


def _smoke_ran(working: Path, out: str) -> None:
    """Fold 0 alone, one epoch (SMOKE outranks EXTRA's train.epochs=3), tuned and exported."""
    from jaguar_reid import layout

    output = working / "output" / f"{EXP}_smoke"
    assert layout.finished_folds(output) == [0]
    assert pd.read_csv(output / "fold0" / layout.TRAIN_LOG)["epoch"].max() == 1
    assert (working / "export" / f"{EXP}_smoke" / layout.MANIFEST).is_file()
    assert f"SMOKE: fold 0 for one epoch, as {EXP}_smoke" in out
    assert not (working / "output" / EXP).exists()


def test_training_notebook_smoke_trains_one_fold_one_epoch(inputs, tmp_path):
    working = tmp_path / "working"
    run = run_notebook("train.ipynb", _training(inputs, working), inputs, tmp_path)
    _smoke_ran(working, run.stdout)
    _section("train.ipynb, SMOKE = True, offline", run.stdout)


def test_a_missing_extra_is_named_fetched_by_the_printed_command_and_installed_offline(
        inputs, tmp_path):
    assert "pytorch-metric-learning" not in {d.metadata["Name"] for d in
                                             metadata.distributions()}
    working = tmp_path / "working"
    settings = _training(inputs, working, OPTIONAL=["losses"],
                         EXTRA=[*TINY, "train.sampler=pk", "loss.contrastive=0.5"])
    try:
        # 1. Without wheels: the check names the wheel and the command, before any work.
        run = run_notebook("train.ipynb", settings, inputs, tmp_path, ok=False)
        assert run.returncode == 1 and not (working / "output").exists()
        message = run.stderr[run.stderr.index("attach a dataset of wheels"):].strip()
        assert "    pytorch-metric-learning>=2.9,<3    (not installed)" in message.splitlines()
        command = message.splitlines()[-1].strip()
        tokens = shlex.split(command)
        assert tokens[:6] == ["pip", "download", "--no-deps", "--python-version",
                              "{}.{}".format(*sys.version_info[:2]), "--only-binary=:all:"]
        assert tokens[-3:] == ["-d", "wheels", "pytorch-metric-learning>=2.9,<3"]
        _section("train.ipynb, OPTIONAL = ['losses'], no wheels: the requirement check",
                 run.stdout + "\n" + message)

        # 2. The one step with network: the command as printed, this Python's pip.
        fetch = tmp_path / "fetch"
        fetch.mkdir()
        done = subprocess.run([sys.executable, "-m", *tokens], cwd=fetch,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        wheels = sorted(p.name for p in (fetch / "wheels").iterdir())
        assert len(wheels) == 1 and wheels[0].startswith("pytorch_metric_learning-")
        _section("the printed command, run with network", f"$ {command}\n"
                 + "\n".join(line for line in done.stdout.splitlines() if "Saved" in line
                             or "Successfully" in line) + f"\nwheels/: {', '.join(wheels)}")

        # 3. The wheels as a dataset: the settings and environment cells install them offline
        # and the check passes; a fresh Python of the replica then has the library's losses.
        shutil.copytree(fetch / "wheels", inputs / "wheels")
        run = run_notebook("train.ipynb", {**settings, "WHEELS": str(inputs / "wheels")},
                           inputs, tmp_path, upto=2)
        assert "every requirement is met, pytorch-metric-learning>=2.9,<3 installed from " \
            f"{inputs / 'wheels'}" in run.stdout
        assert "pip install --no-index --find-links" in run.stdout
        assert metadata.version("pytorch-metric-learning") == wheels[0].split("-")[1]
        criterion = ("from jaguar_reid.config import load_config\n"
                     "from jaguar_reid.training.losses import Criterion\n"
                     "cfg = load_config(['train.sampler=pk', 'train.pk_k=4', "
                     "'train.batch_size=16', 'loss.contrastive=0.5'])\n"
                     "print(type(Criterion(cfg, 8).library['contrastive']).__name__)")
        done = subprocess.run([sys.executable, "-c", criterion], capture_output=True, text=True,
                              timeout=300)
        assert done.stdout.split() == ["ContrastiveLoss"], done.stderr[-2000:]
        _section("train.ipynb with WHEELS set: the environment cell installs offline",
                 run.stdout + f"\nthen loss.contrastive=0.5 builds {done.stdout.strip()}")
    finally:
        # The replica stays Kaggle's: what the notebook installed goes again.
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet",
                        "pytorch-metric-learning"], capture_output=True, timeout=300)
