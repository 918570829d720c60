"""YAML configs with `key=value` overrides.

Every key is declared once in `jaguar_reid.keys` (type, default, bounds or choices, doc, role);
this module resolves defaults <- an experiment YAML's `base:` chain <- `key=value` overrides,
checking each value against its declaration, then the few rules that tie keys together. A key
that does not exist, or a value it cannot take, stops with an error that names the key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jaguar_reid import keys
from jaguar_reid.extras import require
from jaguar_reid.io_utils import UserInputError, atomic_write_text
from jaguar_reid.keys import view_reason
from jaguar_reid.layout import CONFIG_DIR, DEFAULT_CONFIG, FULL, REPO_ROOT
from jaguar_reid.schema import AUTO, RECIPE, BadValue, Key, coerce

__all__ = ["AUTO", "Config", "ConfigError", "load_config"]


class ConfigError(UserInputError):
    """A config file or override that cannot be used; the message names the key."""


class Config(dict):
    """A nested dict whose keys also read as attributes (`cfg.train.epochs`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo: dict) -> Config:
        return _to_config(copy.deepcopy(to_plain(self), memo))

    def get_path(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node


def _to_config(node: Any) -> Any:
    if isinstance(node, Mapping):
        return Config({k: _to_config(v) for k, v in node.items()})
    if isinstance(node, list):
        return [_to_config(v) for v in node]
    return node


def to_plain(node: Any) -> Any:
    """Config -> plain dicts and lists (for YAML/JSON dumps)."""
    if isinstance(node, Mapping):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [to_plain(v) for v in node]
    return node


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys at the top, got {type(data).__name__}")
    return data


def _resolve_relative(path_str: str, relative_to: Path) -> Path:
    path = Path(path_str)
    if path.is_absolute():
        return path
    for base in (relative_to, Path.cwd(), REPO_ROOT, CONFIG_DIR):
        if (base / path).is_file():
            return base / path
    return relative_to / path


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The YAML files from the root `base:` down to `path`, each with its contents."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config files include each other in a loop: {chain}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None or path == DEFAULT_CONFIG.resolve():
        parents: list[tuple[Path, dict]] = []
    else:
        parents = _load_chain(_resolve_relative(str(base), path.parent), (*seen, path))
    return [*parents, (path, data)]


def _parse_cli_value(spec: Key, raw: str) -> Any:
    """A command-line string read as key `spec`'s type, then checked."""
    text = raw.strip()
    if spec.auto and text == AUTO:
        value: Any = AUTO
    elif spec.kind is str:
        value = raw
    elif spec.kind is bool:
        words = {"true": True, "yes": True, "1": True, "on": True,
                 "false": False, "no": False, "0": False, "off": False}
        if text.lower() not in words:
            raise ConfigError(f"command line: key '{spec.name}' expects bool (true/false), "
                              f"got {raw!r}")
        value = words[text.lower()]
    else:
        value = _parse_number(spec, raw) if spec.kind in (int, float) else _UNPARSED
        if value is _UNPARSED:
            try:  # YAML for lists and whatever Python's number syntax did not take
                value = yaml.safe_load(raw) if text else raw
            except yaml.YAMLError:
                value = raw
    return _checked(spec, value, "command line")


_UNPARSED = object()


def _parse_number(spec: Key, raw: str) -> Any:
    """Python's own number syntax first: YAML 1.1 reads `1e-4` as text."""
    for kind in (int, float):
        try:
            number = kind(raw)
        except ValueError:
            continue
        if kind is int or spec.kind is float:
            return number
    return _UNPARSED


def _checked(spec: Key, value: Any, source: str) -> Any:
    try:
        return coerce(spec, value)
    except BadValue as exc:
        raise ConfigError(f"{source}: key '{spec.name}' {exc}") from None


def _unknown_key_error(key: str, known: Iterable[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _flatten(node: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _set_dotted(node: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


# Keys an earlier version had: a run saved then still loads (its value translated), while a
# config a user writes today gets told the new key.
_RETIRED: dict[str, tuple[str, Any]] = {
    "embed.tta_flip": ("embed.tta", lambda flip: ["orig", "flip"] if flip else ["orig"]),
}


def _merge_file(resolved: dict, data: Mapping, source: str, saved: bool = False) -> None:
    for dotted, value in _flatten(data).items():
        if dotted in _RETIRED:
            new_key, translate = _RETIRED[dotted]
            if not saved:
                raise ConfigError(f"{source}: config key '{dotted}' was replaced by '{new_key}'")
            dotted, value = new_key, translate(value)
        if dotted not in keys.SPECS:
            # A whole section given as a scalar (`model: x`) also lands here.
            raise _unknown_key_error(dotted, keys.SPECS, source)
        _set_dotted(resolved, dotted, _checked(keys.SPECS[dotted], value, source))


def parse_overrides(args: Iterable[str]) -> list[tuple[str, str]]:
    """`["a.b=1", "exp=x"]` -> `[("a.b", "1"), ("exp", "x")]`; anything else is an error."""
    pairs = []
    for arg in args:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(
                f"command line: expected key=value (e.g. train.epochs=3), got {arg!r}"
            )
        key, raw = arg.split("=", 1)
        pairs.append((key.strip(), raw))
    return pairs


def load_config(args: Iterable[str] = (), config_path: str | Path | None = None,
                saved: bool = False) -> Config:
    """Resolve defaults <- config file chain <- `key=value` overrides, checking keys and types.
    `saved`: the file is a run's own saved config, whose retired keys are translated."""
    overrides = parse_overrides(args)
    for key, raw in overrides:
        if key == "config":
            config_path = raw
    resolved = keys.defaults()
    if config_path:
        path = Path(config_path)
        if not path.is_absolute() and not path.is_file() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        for file_path, data in _load_chain(path):
            if file_path != DEFAULT_CONFIG.resolve():
                _merge_file(resolved, data, str(file_path), saved)
    for key, raw in overrides:
        if key == "config":
            continue
        if key in _RETIRED:
            raise ConfigError(f"command line: config key '{key}' was replaced by "
                              f"'{_RETIRED[key][0]}'")
        if key not in keys.SPECS:
            raise _unknown_key_error(key, keys.SPECS, "command line")
        _set_dotted(resolved, key, _parse_cli_value(keys.SPECS[key], raw))
    cfg = _to_config(resolved)
    validate(cfg)
    return cfg


# The two figures every step reports (pair ROC-AUC, identity-balanced mAP: the leaderboard's),
# by the names logs, tables and `tune.metric` / `train.monitor` use.
METRICS = ("pair_auc", "map")

def _validate_pseudo_and_student(cfg: Config) -> None:
    """The distillation keys (part of `validate`)."""
    if cfg.train.teacher and cfg.train.sampler == "pk":
        raise ConfigError("key 'train.sampler' must be random with train.teacher: a student "
                          "also trains on unlabelled test images, which P x K cannot group")


PAIR_LOSS_KEYS = ("contrastive", "multi_similarity", "smooth_ap", "recall_k")


def _validate_pair_losses(cfg: Config, pair: list[str]) -> None:
    """What the pair losses need from the batches (part of `validate`)."""
    if pair and cfg.train.teacher:
        raise ConfigError(f"key 'loss.{pair[0]}' cannot train a student (train.teacher): its "
                          f"loss is the teacher's; set loss.{pair[0]}=0")
    if pair and (cfg.train.sampler != "pk" or cfg.train.pk_k < 2):
        raise ConfigError(f"key 'loss.{pair[0]}' needs several images of each identity in a "
                          f"batch: set train.sampler=pk with train.pk_k >= 2 (now "
                          f"train.sampler={cfg.train.sampler}, train.pk_k={cfg.train.pk_k})")
    if pair and cfg.train.batch_size // cfg.train.pk_k < 2 and not cfg.loss.xbm_size:
        raise ConfigError(f"key 'loss.{pair[0]}' needs two identities or more in a batch: "
                          f"train.batch_size={cfg.train.batch_size} holds one of "
                          f"train.pk_k={cfg.train.pk_k} images, so no negatives; lower "
                          "train.pk_k (EVA-02 L at batch 4: pk_k=2) or add loss.xbm_size")


def _validate_losses(cfg: Config) -> None:
    """The loss weights, the memory and the mixup (part of `validate`)."""
    pair = [name for name in PAIR_LOSS_KEYS if cfg.loss[name] > 0]
    if cfg.loss.arcface == 0 and not pair and not cfg.train.teacher:
        raise ConfigError("key 'loss.arcface' is 0 and no pair loss has a weight: nothing "
                          "would train; give loss.arcface or a loss.<pair loss> a weight")
    _validate_pair_losses(cfg, pair)
    memory_on = cfg.loss.contrastive > 0 or cfg.loss.multi_similarity > 0
    if cfg.loss.xbm_size and not memory_on:
        raise ConfigError("key 'loss.xbm_size' keeps embeddings for loss.contrastive or "
                          "loss.multi_similarity; give one of them a weight, or set it to 0")
    if 0 < cfg.loss.xbm_size < cfg.train.batch_size:
        raise ConfigError(f"key 'loss.xbm_size' ({cfg.loss.xbm_size}) must hold at least one "
                          f"batch (train.batch_size={cfg.train.batch_size})")
    if cfg.train.metrix_alpha > 0 and not (memory_on or cfg.loss.recall_k > 0):
        raise ConfigError("key 'train.metrix_alpha' mixes for loss.contrastive, "
                          "loss.multi_similarity or loss.recall_k; give one of them a weight, or "
                          "set it to 0")


def validate(cfg: Config) -> None:
    """The rules that tie keys together; each key alone was checked against its declaration
    (`jaguar_reid.keys`) when it was read."""
    if cfg.model.dynamic_margin and cfg.model.arcface_m_min > cfg.model.arcface_m:
        raise ConfigError(f"key 'model.arcface_m_min' ({cfg.model.arcface_m_min}) must not exceed "
                          f"model.arcface_m ({cfg.model.arcface_m}), the rarest identity's margin")
    if cfg.train.init and cfg.train.init.strip() == cfg.exp:
        raise ConfigError(f"key 'train.init' names this experiment ({cfg.exp!r}): a fold cannot "
                          "start from itself; train into a new exp=NAME")
    _validate_pseudo_and_student(cfg)
    _validate_losses(cfg)
    if cfg.post.knn_backend == "faiss":  # asked for by name: refused before any work
        require("faiss", "post.knn_backend=faiss")
    if cfg.train.sampler == "pk" and cfg.train.batch_size % cfg.train.pk_k:
        raise ConfigError(f"key 'train.batch_size' ({cfg.train.batch_size}) must be a multiple of "
                          f"train.pk_k ({cfg.train.pk_k}) with train.sampler=pk")
    experiment_names(cfg)
    if cfg.submit.weights and not any(cfg.submit.weights):
        raise ConfigError(f"key 'submit.weights' gives every experiment weight 0: "
                          f"{cfg.submit.weights}; give at least one a positive weight")
    if cfg.submit.weights and len(cfg.submit.weights) != len(experiment_names(cfg)):
        raise ConfigError(f"key 'submit.weights' has {len(cfg.submit.weights)} weight(s) for "
                          f"{len(experiment_names(cfg))} experiment(s) of exps="
                          f"{cfg.exps or cfg.exp!r}")


def check_view(view: Any, key: str) -> str:
    """A test-time view name: orig | flip | zoom<f> | flip_zoom<f>, with 0.5 <= f <= 2."""
    reason = view_reason(view)
    if reason:
        raise ConfigError(f"key '{key}': {reason}")
    return view


def with_recipe_of(saved: Config, today: Config) -> tuple[Config, list[str]]:
    """A trained run read today: its own `recipe` values (from its saved config `saved`) with
    today's `runtime` and `after` values. Also the recipe keys today's config sets to another
    value than its default and the run's, as `key=run value (today X)`: they are not applied."""
    merged = copy.deepcopy(today)
    differing = []
    for name, spec in keys.SPECS.items():
        if spec.role != RECIPE:
            continue
        ours, theirs = today.get_path(name), saved.get_path(name)
        _set_dotted(merged, name, copy.deepcopy(theirs))
        if (not spec.content and ours != theirs and ours != spec.default
                and not (spec.auto and ours == AUTO)):
            differing.append(f"{name}={theirs!r} (today {ours!r})")
    return merged, differing


def experiment_names(cfg: Config) -> list[str]:
    """`exps=a,b,c` (an ensemble of experiments), else the one `exp`."""
    names = [n.strip() for n in str(cfg.exps).split(",") if n.strip()] if cfg.exps else [cfg.exp]
    for name in names:
        if "/" in name or name in (".", ".."):
            raise ConfigError(f"key 'exps': {name!r} is not a plain experiment folder name")
    if not names:
        raise ConfigError(f"key 'exps' names no experiment: {cfg.exps!r}; e.g. exps=a,b")
    if len(set(names)) != len(names):
        raise ConfigError(f"key 'exps' names an experiment twice: {cfg.exps!r}")
    return names


def config_digest(cfg: Config) -> str:
    """Short hash of the resolved config, stable across key order."""
    text = yaml.safe_dump(to_plain(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, dump_config(cfg))


def load_saved_config(path: str | Path) -> Config:
    """A config saved with a run, checked against today's defaults: old runs load or fail
    loudly."""
    return load_config([], config_path=path, saved=True)


def parse_fold_spec(spec: Any, n_folds: int, key: str = "fold") -> list[int | str]:
    """`0`, `0..4`, `0,2`, `full`, `all` -> the folds to run, in order; errors name `key`."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_folds))
    folds: list[int | str] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if part == FULL:
                folds.append(FULL)
            elif ".." in part:
                lo, hi = (int(x) for x in part.split(".."))
                if lo > hi:
                    raise ValueError
                folds.extend(range(lo, hi + 1))
            else:
                folds.append(int(part))
        except ValueError:
            raise ConfigError(
                f"key '{key}': expected 0, 0..4, 0,2, full or all; got {spec!r}") from None
    for fold in folds:
        if fold != FULL and not 0 <= int(fold) < n_folds:
            raise ConfigError(f"key '{key}': fold {fold} is out of range for folds.n_folds="
                              f"{n_folds} (valid: 0..{n_folds - 1} or full)")
    return list(dict.fromkeys(folds))

