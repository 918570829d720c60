"""The schema: each key declared once with its role, validation from the declarations alone, the
training digest derived from the roles, a trained fold read with its own recipe, and the
command line's help."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass

import pandas as pd
import pytest

from jaguar_reid import cli, config, keys, layout
from jaguar_reid.config import Config, ConfigError, load_config, with_recipe_of
from jaguar_reid.schema import (
    AFTER,
    AUTO,
    RECIPE,
    ROLES,
    RUNTIME,
    Key,
    coerce,
    key,
    section,
)
from jaguar_reid.training import digest

FOLDS = pd.DataFrame({"filename": ["a.png", "b.png", "c.png"], "fold": [0, 1, 0]})


def _digest(cfg: Config) -> str:
    return digest.training_digest(cfg, FOLDS).current


def test_every_key_has_a_role_a_doc_and_a_default_it_accepts():
    assert len(keys.SPECS) > 150
    for name, spec in keys.SPECS.items():
        assert spec.role in ROLES and spec.doc.strip(), name
        assert coerce(spec, copy.deepcopy(spec.default)) == spec.default, name
        if spec.has_neutral:
            assert spec.role == RECIPE, name


def test_a_process_that_imports_only_the_config_rejects_a_bad_choice():
    code = ("import sys\nfrom jaguar_reid.config import ConfigError, load_config\n"
            "try:\n    load_config(['model.tokens=bogus'])\nexcept ConfigError as e:\n"
            "    print('refused:', e)\n"
            "print(sorted(m for m in sys.modules if m.startswith('jaguar_reid')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "refused: command line: key 'model.tokens' must be one of patches | cls | both" in out
    assert "training" not in out and "retrieval" not in out  # nothing but the foundation


# --------------------------------------------------------------------------- digest by role


def _other_value(spec: Key):
    """A valid value other than the default, or None where none is simple to make."""
    default = spec.default
    if default == AUTO and not spec.choices:
        return {int: 2, list: [0.4, 0.5, 0.6]}.get(spec.kind)
    if spec.choices:
        return next((c for c in spec.choices if c != default), None)
    if spec.kind is bool:
        return not default
    if spec.kind in (int, float) and default != AUTO:
        value = spec.kind(default) + 1
        return value if spec.le is None or value <= spec.le else spec.kind(default) - 1
    if spec.kind is str:
        return default + "x" if default not in ("", AUTO) else "x"
    if spec.kind is list and spec.item in (int, float) and default != AUTO:
        return [*default, default[-1]] if default else [1.0]
    return None


def test_runtime_and_after_keys_never_enter_the_digest():
    """`local.*`, `floor.*`, thread counts, paths, post-processing: any value, same digest."""
    base = load_config([])
    reference = _digest(base)
    tried = []
    for name, spec in keys.SPECS.items():
        if spec.role == RECIPE or name == "train.teacher":
            continue
        value = _other_value(spec)
        if value is None:
            continue
        cfg = copy.deepcopy(base)
        config._set_dotted(cfg, name, value)
        assert _digest(cfg) == reference, name
        tried.append(name)
    assert {"local.top_b", "local.workers", "floor.enabled", "data.num_workers", "data.dir",
            "output_dir", "post.k1", "train.amp_dtype", "cache.workers"} <= set(tried)


def test_every_plain_recipe_key_changes_the_digest():
    base = load_config([])
    reference = _digest(base)
    for name, spec in keys.SPECS.items():
        if spec.role != RECIPE or spec.content:
            continue
        value = _other_value(spec)
        if value is None or (spec.has_neutral and value == spec.neutral):
            continue
        cfg = copy.deepcopy(base)
        config._set_dotted(cfg, name, value)
        assert _digest(cfg) != reference, name


def test_weights_enter_the_digest_by_their_bytes_not_their_path(tmp_path):
    first, moved, other = (tmp_path / n for n in ("a.safetensors", "b.safetensors", "c.bin"))
    first.write_bytes(b"weights")
    moved.write_bytes(b"weights")
    other.write_bytes(b"other weights")
    out = f"output_dir={tmp_path / 'out'}"
    a, b, c = (_digest(load_config([out, f"model.weights={p}"])) for p in (first, moved, other))
    assert a == b != c


# A toy key, added the way every key is: one declaration in its section.
@dataclass(frozen=True)
class _TrainWithToy(keys.Train):
    toy: int = key(0, RECIPE, "a toy recipe key that trains as before at 0", ge=0, neutral=0)


@dataclass(frozen=True)
class _SettingsWithToy(keys.Settings):
    train: _TrainWithToy = section(_TrainWithToy)


@pytest.fixture
def with_toy(monkeypatch):
    specs = keys.specs_of(_SettingsWithToy)
    monkeypatch.setattr(keys, "SPECS", specs)
    monkeypatch.setattr(digest, "SPECS", specs)
    return specs


def test_a_new_key_is_one_declaration(with_toy):
    cfg = load_config(["config=configs/demo.yaml"])
    assert cfg.train.toy == 0  # a default, a type, a check and a digest rule from one line
    with pytest.raises(ConfigError, match="train.toy"):
        load_config(["train.toy=-1"])
    assert _digest(load_config(["train.toy=3"])) != _digest(load_config([]))
    # The earlier format knew no toy: away from its neutral value no earlier fold matches.
    assert digest.training_digest(load_config([]), FOLDS).earlier
    assert digest.training_digest(load_config(["train.toy=3"]), FOLDS).earlier == ()


def test_a_new_recipe_key_at_its_neutral_value_leaves_every_digest_unchanged(monkeypatch):
    runs = ([], ["config=configs/demo.yaml"], ["train.lr=0.1", "loss.arcface=2"])
    before = [_digest(load_config(list(a))) for a in runs]
    specs = keys.specs_of(_SettingsWithToy)
    monkeypatch.setattr(keys, "SPECS", specs)
    monkeypatch.setattr(digest, "SPECS", specs)
    assert [_digest(load_config(list(a))) for a in runs] == before


def test_changing_a_recipe_default_changes_the_digest_of_runs_that_relied_on_it(monkeypatch):
    relied = _digest(load_config([]))
    moved = {**keys.SPECS, "train.epochs": Key(**{**keys.SPECS["train.epochs"].__dict__,
                                                  "default": 30})}
    monkeypatch.setattr(keys, "SPECS", moved)
    monkeypatch.setattr(digest, "SPECS", moved)
    assert load_config([]).train.epochs == 30
    assert _digest(load_config([])) != relied
    assert _digest(load_config(["train.epochs=20"])) == relied  # the value, not "the default"


def test_the_earlier_format_is_reproduced_for_folds_trained_before_roles():
    """Digests the previous code computed for these configs (its training_digest, run on the
    same fold table): a fold it trained is still recognised."""
    earlier = {(): "41c189ac5217", ("config=configs/demo.yaml",): "32f5aaf482f9",
               ("model.attention=glam", "floor.enabled=false", "local.top_b=5"): "9407e18a5b30"}
    folds = pd.DataFrame({"filename": ["a.png", "b.png"], "fold": [0, 1]})
    # The defaults of that time, where they have moved since (a fold trained then saved them).
    then = ["output_dir=/nonexistent", "data.resize=squash", "folds.strategy=grouped"]
    for args, stored in earlier.items():
        found = digest.training_digest(load_config([*then, *args]), folds)
        assert found.matches(stored) and found.current != stored, args
    # ... whatever local.* and floor.enabled say today, since they never decided the weights.
    today = load_config([*then, "local.top_b=7", "floor.enabled=false"])
    assert digest.training_digest(today, folds).matches("41c189ac5217")
    assert not digest.training_digest(load_config([*then, "train.lr=0.1"]), folds).matches(
        "41c189ac5217")
    # Today's defaults (auto geometry, closed folds) are another recipe.
    assert not digest.training_digest(load_config(["output_dir=/nonexistent"]), folds).matches(
        "41c189ac5217")


# --------------------------------------------------------------------------- reading a fold


def test_a_trained_fold_is_read_with_its_own_recipe_and_todays_runtime():
    saved = load_config(["config=configs/demo.yaml", "data.img_size=80", "cache.size=120"])
    today = load_config(["data.img_size=96", "data.num_workers=3", "cache.workers=2",
                         "local.top_b=4", "embed.tta=[orig,flip]"])
    merged, differing = with_recipe_of(saved, today)
    assert (merged.data.img_size, merged.cache.size, merged.data.alpha) == (80, 120, "crop_fill")
    assert merged.model.backbone == "resnet10t" and merged.data.mean == [0.5, 0.5, 0.5]
    assert (merged.data.num_workers, merged.cache.workers, merged.local.top_b) == (3, 2, 4)
    assert merged.embed.tta == ["orig", "flip"] and merged.data.dir == today.data.dir
    assert differing == ["data.img_size=80 (today 96)"]  # asked for, so said; defaults are not
    for name, spec in keys.SPECS.items():
        expected = saved if spec.role == RECIPE else today
        assert merged.get_path(name) == expected.get_path(name), name


# --------------------------------------------------------------------------- the commands


def test_help_lists_the_steps_and_a_steps_keys(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.STEPS)
    cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.epochs = 20  [recipe]  (>= 0)" in out and "local.top_b" not in out
    assert "data.num_workers = 'auto'  [runtime]" in out


def test_print_config_prints_the_resolved_config(capsys):
    cli.main(["tune", "config=configs/demo.yaml", "tune.draws=2", "--print-config"])
    printed = capsys.readouterr().out
    assert "exp: demo\n" in printed and "  draws: 2\n" in printed
    with pytest.raises(SystemExit) as info:
        cli.main(["tune", "tune.draws=x", "--print-config"])
    assert info.value.code == 2 and "tune.draws" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["bash", "train.sh", "--help"], [sys.executable, "submit.py", "-h"],
    [sys.executable, "-m", "jaguar_reid.tune", "--help"], [sys.executable, "-m", "jaguar_reid",
                                                          "--help"]])
def test_every_way_to_start_a_step_answers_help(command):
    done = subprocess.run(command, capture_output=True, text=True, cwd=layout.REPO_ROOT,
                          check=False)
    assert done.returncode == 0 and "usage: jaguar-reid" in done.stdout, done.stderr


def test_every_step_names_a_module_with_a_main_and_known_sections():
    import importlib

    for name, step in cli.STEPS.items():
        assert callable(importlib.import_module(step.module).main), name
        assert set(step.sections) <= set(keys.SECTIONS), name


def test_roles_are_what_the_names_say():
    roles = {name: spec.role for name, spec in keys.SPECS.items()}
    assert {roles[n] for n in keys.SPECS if n.startswith(("local.", "floor.", "post.",
                                                           "tune.", "report."))} <= {AFTER,
                                                                                    RUNTIME}
    assert all(roles[n] == RECIPE for n in keys.SPECS if n.startswith(("aug.", "loss.")))
