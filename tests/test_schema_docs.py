"""`configs/default.yaml` and the key reference in `docs/configuration.md` are written from the
schema (`tools/schema_docs.py`) and stay so; the hand-written docs name only keys that exist;
every key's declaration is complete (a doc line, a default its own checks accept)."""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from jaguar_reid import keys, schema

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "schema_docs.py"
RUN_TOOL = "run python tools/schema_docs.py"
HAND_WRITTEN = ("README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")),
                "kaggle/README.md")
MAX_DOC = 220  # characters: a doc is one line of the reference's table and of default.yaml
# Keys misspelt on purpose: docs/bad_inputs.md shows the error an unknown key gives.
NOT_KEYS_ON_PURPOSE = {("docs/bad_inputs.md", "train.epoch"),
                       ("docs/bad_inputs.md", "train.epochz")}
# `section.name` that names a file, not a key (model.safetensors, train.sh, folds.csv, ...).
FILE_SUFFIXES = {"bin", "csv", "html", "ipynb", "json", "lock", "md", "npz", "onnx", "png",
                 "pt", "pth", "py", "safetensors", "sh", "txt", "yaml"}
# `section.key`, `section.*` or `section.prefix*`, not inside a longer dotted name or a path.
KEY_TOKEN = re.compile(rf"(?<![\w./-])(?:{'|'.join(keys.SECTIONS)})\."
                       r"(?:\*|[a-z_][a-z0-9_]*\*?)(?![\w*])")


@pytest.fixture(scope="module")
def tool() -> Any:
    sys.path.insert(0, str(TOOL.parent))
    try:
        import schema_docs
    finally:
        sys.path.remove(str(TOOL.parent))
    return schema_docs


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where `a` and `b` differ in value or in type (bool, int and float told apart)."""
    if type(a) is not type(b):
        return [f"{where or '<root>'}: {a!r} ({type(a).__name__}) vs {b!r} ({type(b).__name__})"]
    if isinstance(a, dict):
        out = [f"{where}.{k}: only on one side".lstrip(".") for k in a.keys() ^ b.keys()]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{where}.{k}".lstrip("."))
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{where}: {a!r} vs {b!r}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def dotted(tree: dict, prefix: str = "") -> list[str]:
    """Every leaf's dotted name, in the mapping's order."""
    out = []
    for k, v in tree.items():
        out += dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def reference_block() -> str:
    text = (REPO / "docs" / "configuration.md").read_text()
    begin = re.search(r"^<!-- keys: begin\b.*-->$", text, re.MULTILINE)
    end = re.search(r"^<!-- keys: end -->$", text, re.MULTILINE)
    assert begin and end, "docs/configuration.md lost its '<!-- keys: begin/end -->' lines"
    return text[begin.end():end.start()]


# --------------------------------------------------------------------------- generated files


def test_generated_files_are_current(tool):
    differ = tool.stale(tool.rendered())
    assert not differ, (f"{', '.join(tool.shown(p) for p in differ)} differ from "
                        f"src/jaguar_reid/keys.py: {RUN_TOOL}")


def test_check_names_a_stale_file_and_writes_nothing(tool, tmp_path, monkeypatch, capsys):
    for name, path in (("DEFAULT_YAML", tool.DEFAULT_YAML), ("REFERENCE", tool.REFERENCE)):
        copy = tmp_path / path.name
        copy.write_text(path.read_text())
        monkeypatch.setattr(tool, name, copy)
    assert tool.main(["--check"]) == 0
    stale_yaml = tool.DEFAULT_YAML.read_text().replace("img_size: 448", "img_size: 224")
    tool.DEFAULT_YAML.write_text(stale_yaml)
    assert tool.main(["--check"]) == 1
    assert str(tool.DEFAULT_YAML) in capsys.readouterr().err
    assert tool.DEFAULT_YAML.read_text() == stale_yaml
    assert tool.main([]) == 0
    assert tool.main(["--check"]) == 0
    assert "img_size: 448" in tool.DEFAULT_YAML.read_text()


def test_default_yaml_reads_back_as_the_defaults_types_included():
    loaded = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    wrong = differences(loaded, keys.defaults())
    assert not wrong, f"configs/default.yaml vs keys.defaults(): {wrong}; {RUN_TOOL}"
    assert dotted(loaded) == list(keys.SPECS), f"keys missing or out of order: {RUN_TOOL}"


def test_every_key_is_in_the_reference():
    rows = re.findall(r"^\| `([^`]+)` \|", reference_block(), re.MULTILINE)
    assert rows == list(keys.SPECS), \
        f"docs/configuration.md's key reference is not the schema's: {RUN_TOOL}"


def test_values_are_written_to_read_back_as_themselves(tool):
    for value in (2e-05, 1e16, 0.001, 3.0, -1, True, "", "auto", "001", "true", "1.5", "a b",
                  "x: y", "#", [], [0.0, 3.0], ["none", "rowmax"], [False, True]):
        text = tool.value_text(value)
        assert not differences(yaml.safe_load(f"v: {text}")["v"], value), (value, text)
    assert tool.value_text(2e-05) == "2.0e-5" and tool.value_text("") == '""'


# --------------------------------------------------------------------------- hand-written docs


def key_tokens(text: str) -> list[tuple[int, str]]:
    """(line, token) of everything in `text` that looks like `section.key`."""
    text = text.replace("\\_", "_").replace("\\*", "*")  # Markdown escapes
    return [(n, m.group(0)) for n, line in enumerate(text.splitlines(), 1)
            for m in KEY_TOKEN.finditer(line)]


def is_key_or_file(token: str) -> bool:
    if token in keys.SPECS:
        return True
    if token.endswith("*"):
        return any(fnmatch.fnmatchcase(name, token) for name in keys.SPECS)
    return token.split(".", 1)[1] in FILE_SUFFIXES


def test_key_tokens_are_found_and_judged():
    found = [t for _, t in key_tokens("`train.epochs`, post.k1=3, model.arcface\\_\\*, "
                                      "jaguar_reid.data.cache, output/a/train.sh, data.*, "
                                      "train.FOLD_FILES, loss.nope")]
    assert found == ["train.epochs", "post.k1", "model.arcface_*", "data.*", "loss.nope"]
    assert [is_key_or_file(t) for t in found] == [True, True, True, True, False]
    assert is_key_or_file("model.safetensors") and is_key_or_file("train.sh")
    assert not is_key_or_file("train.epoch") and not is_key_or_file("model.nothing*")


def test_hand_written_docs_name_only_existing_keys():
    bad = [(name, line, token) for name in HAND_WRITTEN
           for line, token in key_tokens((REPO / name).read_text())
           if not is_key_or_file(token) and (name, token) not in NOT_KEYS_ON_PURPOSE]
    shown = "\n".join(f"  {name}:{line}: {token}" for name, line, token in bad)
    assert not bad, f"keys that src/jaguar_reid/keys.py does not declare:\n{shown}"
    for name, token in sorted(NOT_KEYS_ON_PURPOSE):
        assert token not in keys.SPECS, f"{token} is a key now: drop it from NOT_KEYS_ON_PURPOSE"
        assert token in (REPO / name).read_text(), f"{name} no longer names {token}: drop it"


# --------------------------------------------------------------------------- declarations


def declaration_problems(spec: schema.Key, max_doc: int = MAX_DOC) -> list[str]:
    """What is missing or inconsistent in one key's declaration."""
    problems = []
    if not spec.doc.strip() or "\n" in spec.doc:
        problems.append("needs a one-line doc")
    if len(spec.doc) > max_doc:
        problems.append(f"doc of {len(spec.doc)} characters (at most {max_doc})")
    if spec.role not in schema.ROLES:
        problems.append(f"role {spec.role!r} is not one of {schema.ROLES}")
    values = spec.default if isinstance(spec.default, list) else [spec.default]
    if spec.choices and any(v not in spec.choices for v in values):
        problems.append(f"default {spec.default!r} is not among {spec.choices}")
    for label, value in (("default", spec.default),
                         *((("neutral", spec.neutral),) if spec.has_neutral else ())):
        try:
            checked = schema.coerce(spec, value)
        except schema.BadValue as exc:
            problems.append(f"{label} {value!r} fails its own checks: {exc}")
            continue
        if checked != value or type(checked) is not type(value):  # "3" for an int, say
            problems.append(f"{label} {value!r} is not of the key's type ({checked!r})")
    return problems


def test_every_declaration_is_complete():
    problems = {name: declaration_problems(spec, MAX_DOC)
                for name, spec in keys.SPECS.items()}
    problems = {name: found for name, found in problems.items() if found}
    assert not problems, f"fix in src/jaguar_reid/keys.py: {problems}"


def test_an_incomplete_declaration_is_caught():
    good = schema.Key(name="x.y", kind=int, default=3, role=schema.RECIPE, doc="a number",
                      ge=0, choices=(1, 3))
    assert declaration_problems(good) == []
    bad = {"doc": {"doc": ""}, "long": {"doc": "x" * (MAX_DOC + 1)},
           "choice": {"default": 2}, "bounds": {"default": -1, "choices": ()},
           "type": {"default": "3", "choices": ()}, "role": {"role": "later"}}
    for what, change in bad.items():
        spec = schema.Key(**{**good.__dict__, **change})
        assert declaration_problems(spec), what
