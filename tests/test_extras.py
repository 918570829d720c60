"""Optional libraries: a missing one is named with the extra that installs it."""

from __future__ import annotations

import sys

import pytest

from jaguar_reid import extras
from jaguar_reid.io_utils import UserInputError, user_message


@pytest.mark.parametrize(("module", "extra", "wheel"), [
    ("pytorch_metric_learning", "losses", "pytorch-metric-learning"),
    ("pytorch_metric_learning.losses", "losses", "pytorch-metric-learning"),
    ("torch.utils.tensorboard", "tensorboard", "tensorboard"),
    ("faiss", "faiss", "faiss-cpu"),
    ("kornia.feature", "kornia", "kornia"),
])
def test_the_message_names_the_extra_and_the_wheel(module, extra, wheel):
    text = extras.missing_message(module, "the feature=on")
    assert text.startswith("the feature=on needs ")
    assert f"pip install 'jaguar-reid[{extra}]'" in text and f"the wheel of {wheel}" in text


def test_require_turns_an_import_error_into_one_user_line(monkeypatch):
    assert extras.available("json")
    monkeypatch.setitem(sys.modules, "json", None)  # None in sys.modules: the import fails
    assert not extras.available("json")
    monkeypatch.setitem(extras.EXTRAS, "json", extras.Extra("faiss", ("faiss-cpu",)))
    with pytest.raises(UserInputError) as caught:
        extras.require("json", "post.knn_backend=faiss")
    line = user_message(caught.value)
    assert "\n" not in line and line.startswith("post.knn_backend=faiss needs faiss-cpu")


def test_a_library_that_is_there_but_fails_to_import_is_one_line(monkeypatch, tmp_path):
    """Installed but broken (another version's binary, say): not called missing."""
    package = tmp_path / "crashy_lib"
    package.mkdir()
    (package / "__init__.py").write_text("raise AttributeError('_ARRAY_API not found')\n")
    (tmp_path / "halfway.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, kind in (("crashy_lib", "AttributeError"), ("halfway", "ModuleNotFoundError")):
        monkeypatch.setitem(extras.EXTRAS, name, extras.Extra("faiss", ("faiss-cpu",)))
        with pytest.raises(UserInputError) as caught:
            extras.require(name, "post.knn_backend=faiss")
        line = user_message(caught.value)
        assert "\n" not in line and "installed but fails to import" in line
        assert f"({kind}: " in line and "--force-reinstall 'jaguar-reid[faiss]'" in line


def test_faiss_asked_for_by_name_is_refused_when_the_config_is_read(monkeypatch, tmp_path):
    from jaguar_reid.config import load_config

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(UserInputError, match=r"post.knn_backend=faiss needs faiss-cpu"):
        load_config([f"output_dir={tmp_path}", "post.knn_backend=faiss"])
    assert load_config([f"output_dir={tmp_path}", "post.knn_backend=auto"]).post.knn_backend \
        == "auto"
