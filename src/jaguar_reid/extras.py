"""Optional libraries: each is imported where a feature uses it, never at package import, so
a submission and the default training recipe need only what Kaggle's image ships. Asking for
a feature whose library is absent stops in one line naming the extra to install (or, on an
offline Kaggle notebook, the wheel to attach)."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from jaguar_reid.io_utils import UserInputError


@dataclass(frozen=True)
class Extra:
    """One optional dependency group of pyproject.toml's [project.optional-dependencies]."""

    name: str  # the extra: pip install 'jaguar-reid[<name>]'
    distributions: tuple[str, ...]  # what pip installs for it (the wheels to attach)


# The import name of each optional module -> its extra. pyproject.toml declares the ranges;
# tests/test_requirements.py checks that every extra named here exists there.
EXTRAS: dict[str, Extra] = {
    "pytorch_metric_learning": Extra("losses", ("pytorch-metric-learning",)),
    "tensorboard": Extra("tensorboard", ("tensorboard",)),
    "torch.utils.tensorboard": Extra("tensorboard", ("tensorboard",)),
    "onnx": Extra("onnx", ("onnx", "onnxruntime")),
    "onnxruntime": Extra("onnx", ("onnx", "onnxruntime")),
    "faiss": Extra("faiss", ("faiss-cpu",)),
    "kornia": Extra("kornia", ("kornia",)),
}


class MissingExtra(UserInputError):
    """A feature was asked for whose optional library is not installed."""


def _extra_of(module: str) -> Extra:
    parts = module.split(".")
    # The longest declared prefix: torch.utils.tensorboard is tensorboard's, not torch's.
    return next(EXTRAS[name] for n in range(len(parts), 0, -1)
                if (name := ".".join(parts[:n])) in EXTRAS)


def missing_message(module: str, feature: str) -> str:
    """The one line: which feature, which library, how to get it online and offline."""
    extra = _extra_of(module)
    wheels = ", ".join(extra.distributions)
    return (f"{feature} needs {wheels}, which is not installed: pip install "
            f"'jaguar-reid[{extra.name}]' (offline, e.g. a Kaggle notebook: attach the wheel of "
            f"{wheels}; kaggle/README.md)")


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or MissingExtra naming `feature` (a key=value the user set) and the
    extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if _installed(module):  # there, but broken: another version's binary, a bad install
            raise MissingExtra(broken_message(module, feature, exc)) from None
        raise MissingExtra(missing_message(module, feature)) from None
    except Exception as exc:  # a library that crashes while importing is as unusable
        raise MissingExtra(broken_message(module, feature, exc)) from None


def _installed(module: str) -> bool:
    """Whether the module's top-level package is on the path at all (not whether it imports)."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def broken_message(module: str, feature: str, exc: BaseException) -> str:
    """The one line for a library that is installed but does not import."""
    extra = _extra_of(module)
    wheels = ", ".join(extra.distributions)
    first = (str(exc).splitlines() or [""])[0][:200]
    return (f"{feature} needs {wheels}, which is installed but fails to import "
            f"({type(exc).__name__}: {first}); reinstall it: pip install --force-reinstall "
            f"'jaguar-reid[{extra.name}]' (offline: the wheel of {wheels} made for this Python "
            "and these libraries)")


def available(module: str) -> bool:
    """Whether an optional module imports (for `auto` choices that fall back without it)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
