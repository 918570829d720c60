"""Optional libraries: each is imported where a feature uses it, never at package import, so
a submission and the default training recipe need only what Kaggle's image ships. Asking for
a feature whose library is absent stops in one line naming the extra to install (or, on an
offline Kaggle notebook, the wheel to attach)."""

from __future__ import annotations

import importlib
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


def missing_message(module: str, feature: str) -> str:
    """The one line: which feature, which library, how to get it online and offline."""
    parts = module.split(".")
    # The longest declared prefix: torch.utils.tensorboard is tensorboard's, not torch's.
    extra = next(EXTRAS[name] for n in range(len(parts), 0, -1)
                 if (name := ".".join(parts[:n])) in EXTRAS)
    wheels = ", ".join(extra.distributions)
    return (f"{feature} needs {wheels}, which is not installed: pip install "
            f"'jaguar-reid[{extra.name}]' (offline, e.g. a Kaggle notebook: attach the wheel of "
            f"{wheels}; kaggle/README.md)")


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or MissingExtra naming `feature` (a key=value the user set) and the
    extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(missing_message(module, feature)) from None


def available(module: str) -> bool:
    """Whether an optional module imports (for `auto` choices that fall back without it)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
