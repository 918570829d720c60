"""The requirement files: runtime ranges in pyproject.toml (a lower and an upper bound each),
the development tools apart in requirements-dev.txt, and tools/oldest_requirements.py pinning
exactly the lower bounds (checked here with an independent parse by `packaging`). Only what
Kaggle's image ships (kaggle/image.txt) is required: every module imports without the optional
extras, and a feature asked for without its extra stops in one line naming it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from jaguar_reid.config import load_config
from jaguar_reid.extras import EXTRAS as OPTIONAL_MODULES
from jaguar_reid.extras import MissingExtra
from jaguar_reid.training.distill import distill_loss
from jaguar_reid.training.losses import LIBRARY_LOSSES, Criterion
from tests.helpers import base_args, make_data

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency reads TOML there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "oldest_requirements.py"


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_lines(name: str) -> list[str]:
    """The requirement lines of a requirements file: no comments, no blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in (REPO / name).read_text().splitlines())
    return [line for line in lines if line]


def bounds(requirement: Requirement) -> tuple[Version, Version]:
    """The `>=` and `<` versions of a requirement, which must have exactly these two clauses."""
    ops = {spec.operator: Version(spec.version) for spec in requirement.specifier}
    assert sorted(ops) == ["<", ">="] and len(requirement.specifier) == 2, \
        f"{requirement}: wants one '>=' lower and one '<' upper bound, nothing else"
    return ops[">="], ops["<"]


RUNTIME = [Requirement(text) for text in project()["dependencies"]]
EXTRAS = {name: [Requirement(text) for text in reqs]
          for name, reqs in project()["optional-dependencies"].items()}
DEV = [Requirement(line) for line in requirement_lines("requirements-dev.txt")]


OPTIONAL = [r for reqs in EXTRAS.values() for r in reqs]


@pytest.mark.parametrize("requirement", RUNTIME + OPTIONAL + DEV, ids=str)
def test_every_requirement_is_a_range(requirement):
    lower, upper = bounds(requirement)
    assert lower < upper
    assert requirement.specifier.contains(lower) and not requirement.specifier.contains(upper)
    assert requirement.marker is None and not requirement.url


def test_runtime_names_are_unique_and_the_usual_ones():
    names = [canonicalize_name(r.name) for r in RUNTIME]
    assert len(names) == len(set(names))
    assert {"torch", "torchvision", "timm", "numpy"} <= set(names)


def test_requirements_txt_is_the_runtime_set():
    """requirements.txt installs this package (and so the runtime ranges), nothing else."""
    assert requirement_lines("requirements.txt") == ["-e ."]


def test_development_tools_do_not_repeat_runtime_dependencies():
    runtime = {canonicalize_name(r.name) for r in RUNTIME}
    dev = [canonicalize_name(r.name) for r in DEV]
    assert len(dev) == len(set(dev))
    assert not runtime & set(dev), "declared in pyproject.toml already"
    assert {"pytest", "hypothesis", "ruff", "packaging"} <= set(dev)


def test_optional_extras_and_development_tools_agree():
    """The tests of every optional feature run with the same ranges `pip install .[onnx]`,
    `.[losses]`... give users."""
    dev = {canonicalize_name(r.name): r.specifier for r in DEV}
    for requirement in OPTIONAL:
        assert dev[canonicalize_name(requirement.name)] == requirement.specifier


def test_every_optional_module_names_an_extra_of_pyproject():
    """jaguar_reid.extras names, per optional module, the extra and its distributions: the
    same as pyproject.toml declares."""
    assert {extra.name for extra in OPTIONAL_MODULES.values()} == set(EXTRAS)
    for module, extra in OPTIONAL_MODULES.items():
        declared = {canonicalize_name(r.name) for r in EXTRAS[extra.name]}
        assert {canonicalize_name(d) for d in extra.distributions} == declared, module


# --------------------------------------------------------------------------- Kaggle's image

def kaggle_image() -> dict[str, Version]:
    """kaggle/image.txt: each distribution (and `python`) with the version Kaggle ships."""
    lines = (line.split() for line in (REPO / "kaggle" / "image.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {canonicalize_name(fields[0]): Version(fields[1]) for fields in lines}


def test_kaggle_image_meets_every_runtime_range():
    """No lower bound above what Kaggle ships: the submission and the default recipe need no
    wheel there. The replica (kaggle/replica.sh) runs both notebooks with these versions."""
    image = kaggle_image()
    assert image["python"] in SpecifierSet(project()["requires-python"])
    for requirement in RUNTIME + EXTRAS["tensorboard"]:
        version = image[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), \
            f"{requirement}: Kaggle ships {version}"
    assert "pytorch-metric-learning" not in image  # hence the extra `losses`
    assert not {canonicalize_name(r.name) for r in RUNTIME} - image.keys()


# --------------------------------------------------------------------------- without extras

# Put before anything else in a fresh Python: every optional module (jaguar_reid.extras) is
# absent, as in Kaggle's image without wheels.
WITHOUT_EXTRAS = f"""
import sys

# `import onnx` (or any of its modules) then raises ModuleNotFoundError, and
# importlib.util.find_spec says None, as where it is not installed.
sys.modules.update(dict.fromkeys({sorted(OPTIONAL_MODULES)!r}))
"""


def test_every_module_imports_without_the_optional_extras():
    """A submission and the default recipe import nothing an extra provides: every module of
    the package imports with all of them absent."""
    code = WITHOUT_EXTRAS + """
import importlib
import pkgutil

import jaguar_reid

names = [m.name for m in pkgutil.walk_packages(jaguar_reid.__path__, "jaguar_reid.")]
for name in names:
    importlib.import_module(name)
for module in ("pytorch_metric_learning", "onnx", "faiss", "kornia", "tensorboard"):
    assert sys.modules[module] is None, module
print(len(names))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 50  # the whole package, not a few modules


PK = ["train.sampler=pk", "train.pk_k=4", "train.batch_size=16"]  # what pair losses need


@pytest.fixture
def without_metric_learning(monkeypatch):
    """pytorch-metric-learning absent in this process, its modules imported already or not."""
    for name in [n for n in sys.modules if n.split(".")[0] == "pytorch_metric_learning"]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("pytorch_metric_learning", "pytorch_metric_learning.losses",
                 "pytorch_metric_learning.distances"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError


@pytest.mark.parametrize("loss", LIBRARY_LOSSES)
def test_a_library_loss_without_its_extra_is_one_line_naming_it(loss, without_metric_learning):
    with pytest.raises(MissingExtra) as refused:
        Criterion(load_config([*PK, f"loss.{loss}=0.5"]), 8)
    message = str(refused.value)
    assert message.startswith(f"loss.{loss}=0.5 needs pytorch-metric-learning, which is not "
                              "installed: pip install 'jaguar-reid[losses]'")
    assert "\n" not in message
    # The default recipe (ArcFace) and the losses written here need nothing of it.
    Criterion(load_config([]), 8)
    Criterion(load_config([*PK, "loss.recall_k=1", "train.metrix_alpha=2"]), 8)


def test_contrastive_distillation_without_the_extra_is_refused_before_training(
        without_metric_learning):
    with pytest.raises(MissingExtra, match=r"^train\.distill_loss=contr_reg needs "
                                           r"pytorch-metric-learning.*jaguar-reid\[losses\]"):
        Criterion(load_config(["train.teacher=a", "train.distill_loss=contr_reg"]), 8)
    Criterion(load_config(["train.teacher=a", "train.distill_loss=reg"]), 8)
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.tensor([0, 0, 1, 1])
    assert distill_loss(student, teacher, labels, "reg", 0.5) > 0
    with pytest.raises(MissingExtra, match="contr_reg"):
        distill_loss(student, teacher, labels, "contr_reg", 0.5)


@pytest.mark.parametrize("setting", [[*PK, "loss.smooth_ap=0.5"],
                                     ["train.teacher=a", "train.distill_loss=contr_reg"]])
def test_train_refuses_a_missing_losses_extra_before_any_work(setting, tmp_path, monkeypatch,
                                                              without_metric_learning):
    """Refused in main, before the image cache, the folds file or a teacher's embedding."""
    from jaguar_reid import train

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the extra was checked")
    for name in ("recipe", "prepare", "run", "student"):
        monkeypatch.setattr(train, name, no_work)
    out = tmp_path / "out"
    with pytest.raises(MissingExtra, match=r"needs pytorch-metric-learning"):
        train.main([*setting, "device=cpu", f"output_dir={out}", f"data.dir={tmp_path}"])
    assert not out.exists()


def test_training_with_a_library_loss_and_no_extra_stops_in_one_line(tmp_path):
    """The command line: exit 2, one line, no traceback, before any epoch."""
    data = make_data(tmp_path / "data")
    args = base_args(data, tmp_path, "config=configs/demo.yaml", "model.backbone=resnet18",
                     "data.img_size=32", "fold=0", "loss.multi_similarity=1",
                     "train.sampler=pk", "train.pk_k=2", "train.batch_size=4")
    code = WITHOUT_EXTRAS + f"""
import runpy
sys.argv = ["train", *{args!r}]
runpy.run_module("jaguar_reid.train", run_name="__main__", alter_sys=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "error: loss.multi_similarity=1 needs pytorch-metric-learning, which is not installed: "
        "pip install 'jaguar-reid[losses]' (offline, e.g. a Kaggle notebook: attach the wheel "
        "of pytorch-metric-learning; kaggle/README.md)"]
    assert not list((tmp_path / "out").rglob("log.csv"))  # no epoch ran


def oldest(*args: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          check=True, timeout=60)
    pins = [Requirement(line) for line in done.stdout.split()]
    assert all(len(p.specifier) == 1 and next(iter(p.specifier)).operator == "==" for p in pins)
    return {canonicalize_name(p.name): next(iter(p.specifier)).version for p in pins}


def lower_bounds(requirements: list[Requirement]) -> dict[str, str]:
    return {canonicalize_name(r.name): next(s.version for s in r.specifier if s.operator == ">=")
            for r in requirements}


def test_oldest_requirements_pins_exactly_the_lower_bounds():
    assert oldest() == lower_bounds(RUNTIME)
    assert oldest("--extra", "onnx") == lower_bounds(RUNTIME + EXTRAS["onnx"])


def test_oldest_requirements_refuses_what_it_cannot_pin(tmp_path):
    unreadable = ('["numpy"]', '["numpy<3"]', '["numpy>=1,>=2"]',
                  '["numpy>=1; python_version<\'4\'"]')
    for deps in unreadable:
        pyproject = tmp_path / "pyproject.toml"
        pyproject.write_text(f"[project]\nname = 'x'\ndependencies = {deps}\n")
        done = subprocess.run([sys.executable, str(SCRIPT), "--pyproject", str(pyproject)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stdout == "", deps
        assert "oldest_requirements:" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--extra", "no-such-extra"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no optional dependencies 'no-such-extra'" in done.stderr


@pytest.fixture
def without_kornia(monkeypatch):
    """kornia absent in this process, its modules imported already or not."""
    for name in [n for n in sys.modules if n.split(".")[0] == "kornia"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "kornia", None)
    monkeypatch.setitem(sys.modules, "kornia.feature", None)


def test_tune_refuses_learned_local_features_without_kornia_before_the_search(
        tmp_path, monkeypatch, without_kornia):
    from jaguar_reid.retrieval import search

    def no_work(*args, **kwargs):
        raise AssertionError("the search started before kornia was checked")
    monkeypatch.setattr(search, "load_folds", no_work)
    weights = tmp_path / "disk.pth"
    weights.write_bytes(b"")
    cfg = load_config(["tune.local=true", "local.extractor=disk", f"local.weights={weights}",
                       "device=cpu", f"output_dir={tmp_path}"])
    with pytest.raises(MissingExtra) as refused:
        search.tune(cfg)
    # Only the key that was set is named.
    assert str(refused.value).startswith("local.extractor=disk needs kornia, which is not "
                                         "installed: pip install 'jaguar-reid[kornia]'")
    cfg = load_config(["tune.local=true", "local.matcher=lightglue", "device=cpu",
                       f"output_dir={tmp_path}"])
    with pytest.raises(MissingExtra, match=r"^local\.matcher=lightglue needs kornia"):
        search.tune(cfg)
    with pytest.raises(AssertionError, match="search started"):  # the default needs no kornia
        search.tune(load_config(["tune.local=true", "device=cpu", f"output_dir={tmp_path}"]))


def test_submission_refuses_a_calibration_with_learned_features_without_kornia(
        tmp_path, without_kornia):
    """The calibration's own local.* keys are the ones verification runs with: checked when it
    is loaded, before any fold embeds the test images."""
    from jaguar_reid.retrieval.fusion import FusionModel
    from jaguar_reid.retrieval.search import load_fusion

    model = FusionModel("logistic", (1.0, 0.1, 0.0), 0.0)
    keys = dict(load_config(["local.matcher=lightglue"]).local)
    choice = tmp_path / "choice.json"
    choice.write_text(json.dumps({"fusion": {"model": model.to_dict(), "local": keys}}))
    with pytest.raises(MissingExtra, match=r"^local\.matcher=lightglue needs kornia"):
        load_fusion(str(choice))
    keys = dict(load_config([]).local)
    choice.write_text(json.dumps({"fusion": {"model": model.to_dict(), "local": keys}}))
    assert load_fusion(str(choice)) == (model, keys)
