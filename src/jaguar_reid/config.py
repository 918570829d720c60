"""YAML configs with `key=value` overrides.

`configs/default.yaml` is the schema: every knob exists there with its one default and its
type. An experiment YAML names a `base:` file and changes a few keys; the command line changes
more (`train.epochs=3`). A key that does not exist in the defaults, or a value of the wrong type,
stops with an error that names the key.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jaguar_reid.io_utils import AMP_DTYPES, UserInputError, atomic_write_text
from jaguar_reid.layout import CONFIG_DIR, DEFAULT_CONFIG, FULL, REPO_ROOT

AUTO = "auto"  # a value resolved later from the backbone (data.mean, data.std, ...)
# Keys whose default `auto` may be replaced by a value of another type than text.
AUTO_OR_VALUE: dict[str, type] = {"data.mean": list, "data.std": list, "data.num_workers": int}
# Keys that steer loading rather than being part of the resolved config.
_META_KEYS = ("config", "base")


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


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list"}.get(
        type(value), type(value).__name__
    )


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Value checked against the default's type; ints are accepted where floats are expected."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # lr=nan would train until the first NaN loss
                raise ConfigError(f"{source}: key '{key}' expects a finite number, got {value!r}")
            return float(value)
    elif default == AUTO and key in AUTO_OR_VALUE and isinstance(value, AUTO_OR_VALUE[key]) \
            and not isinstance(value, bool):
        return value  # `auto` or an explicit value (data.mean: [0.5, 0.5, 0.5], num_workers: 2)
    elif isinstance(default, str):
        # A YAML `fold: 0` or `exp: 001` is meant as text.
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    else:
        return value
    expected = (f"auto or {AUTO_OR_VALUE[key].__name__}" if key in AUTO_OR_VALUE
                else _type_name(default))
    raise ConfigError(
        f"{source}: key '{key}' expects {expected} (default {default!r}), "
        f"got {value!r} ({_type_name(value)})"
    )


def _parse_cli_value(key: str, raw: str, default: Any) -> Any:
    """Parse a command-line string guided by the default's type."""
    source = "command line"
    if key in AUTO_OR_VALUE and raw.strip() != AUTO:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{source}: key '{key}' expects auto or "
                              f"{AUTO_OR_VALUE[key].__name__}, got {raw!r}") from None
        return _coerce(key, value, default, source)
    if isinstance(default, str):
        return raw
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{source}: key '{key}' expects bool (true/false), got {raw!r}")
    # Python's own number syntax first: YAML 1.1 reads `1e-4` as text.
    for kind in (int, float):
        if isinstance(default, (int, float)):
            try:
                return _coerce(key, kind(raw), default, source)
            except (ValueError, ConfigError):
                pass
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return _coerce(key, value, default, source)


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


def _merge_file(resolved: dict, defaults_flat: dict, data: Mapping, source: str,
                saved: bool = False) -> None:
    for dotted, value in _flatten(data).items():
        if dotted in _RETIRED:
            new_key, translate = _RETIRED[dotted]
            if not saved:
                raise ConfigError(f"{source}: config key '{dotted}' was replaced by '{new_key}'")
            dotted, value = new_key, translate(value)
        if dotted not in defaults_flat:
            # A whole section given as a scalar (`model: x`) also lands here.
            raise _unknown_key_error(dotted, defaults_flat, source)
        _set_dotted(resolved, dotted, _coerce(dotted, value, defaults_flat[dotted], source))


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
    defaults = _read_yaml(DEFAULT_CONFIG)
    defaults.pop("base", None)
    defaults_flat = _flatten(defaults)
    resolved = copy.deepcopy(defaults)

    if config_path:
        path = Path(config_path)
        if not path.is_absolute() and not path.is_file() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        for file_path, data in _load_chain(path):
            if file_path != DEFAULT_CONFIG.resolve():
                _merge_file(resolved, defaults_flat, data, str(file_path), saved)

    for key, raw in overrides:
        if key == "config":
            continue
        if key in _RETIRED:
            raise ConfigError(f"command line: config key '{key}' was replaced by "
                              f"'{_RETIRED[key][0]}'")
        if key not in defaults_flat:
            raise _unknown_key_error(key, defaults_flat, "command line")
        _set_dotted(resolved, key, _parse_cli_value(key, raw, defaults_flat[key]))

    cfg = _to_config(resolved)
    validate(cfg)
    return cfg


# The two figures every step reports (pair ROC-AUC, identity-balanced mAP: the leaderboard's),
# by the names logs, tables and `tune.metric` / `train.monitor` use.
METRICS = ("pair_auc", "map")

# Keys whose value is one of a list. Each list lives beside the code that implements it and
# is declared here when that module is imported (`declare_choices`); `validate` checks every
# declared key, and a test checks that configs/default.yaml's defaults are among them.
CHOICES: dict[str, tuple] = {}


def declare_choices(key: str, choices: Iterable[Any]) -> tuple:
    """Register the values config key `key` may take; returns them as a tuple, so the
    implementing module owns the one list: `MODES = declare_choices("x.mode", ("a", "b"))`."""
    CHOICES[key] = tuple(choices)
    return CHOICES[key]


declare_choices("train.amp_dtype", AMP_DTYPES)  # io_utils.amp_dtype implements them


def _validate_pseudo_and_student(cfg: Config) -> None:
    """The pseudo-label and distillation keys (part of `validate`)."""
    if not 0.0 < cfg.pseudo.min_precision <= 1.0:
        raise ConfigError(f"key 'pseudo.min_precision' must be in (0, 1]; got "
                          f"{cfg.pseudo.min_precision}")
    if cfg.pseudo.scale <= 0:
        raise ConfigError(f"key 'pseudo.scale' must be above 0; got {cfg.pseudo.scale}")
    if not -1.0 <= cfg.train.distill_margin < 1.0:
        raise ConfigError(f"key 'train.distill_margin' is a cosine in [-1, 1); got "
                          f"{cfg.train.distill_margin}")
    if cfg.train.teacher and cfg.train.sampler == "pk":
        raise ConfigError("key 'train.sampler' must be random with train.teacher: a student "
                          "also trains on unlabelled test images, which P x K cannot group")


PAIR_LOSS_KEYS = ("contrastive", "multi_similarity", "smooth_ap", "recall_k")


def _validate_losses(cfg: Config) -> None:
    """The loss weights and the mixup (part of `validate`)."""
    for name in ("arcface", *PAIR_LOSS_KEYS):
        _check_numbers(cfg, f"loss.{name}", 0.0, 1e6)
    pair = [name for name in PAIR_LOSS_KEYS if cfg.loss[name] > 0]
    if cfg.loss.arcface == 0 and not pair and not cfg.train.teacher:
        raise ConfigError("key 'loss.arcface' is 0 and no pair loss has a weight: nothing "
                          "would train; give loss.arcface or a loss.<pair loss> a weight")
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
    for dotted in ("loss.smooth_ap_tau", "loss.recall_tau1", "loss.recall_tau2",
                   "loss.ms_alpha", "loss.ms_beta"):
        if cfg.get_path(dotted) <= 0:
            raise ConfigError(f"key '{dotted}' must be above 0; got {cfg.get_path(dotted)}")
    _check_numbers(cfg, "loss.contrastive_margin", -1.0, 1.0)
    _check_numbers(cfg, "loss.ms_base", -1.0, 1.0)
    ks = cfg.loss.recall_ks
    if not isinstance(ks, list) or not ks:
        raise ConfigError(f"key 'loss.recall_ks' must be a list of whole numbers >= 1; got {ks!r}")
    _check_numbers(cfg, "loss.recall_ks", 1, 1e9, int)
    _check_numbers(cfg, "loss.xbm_size", 0, 1e9, int)
    memory_on = cfg.loss.contrastive > 0 or cfg.loss.multi_similarity > 0
    if cfg.loss.xbm_size and not memory_on:
        raise ConfigError("key 'loss.xbm_size' keeps embeddings for loss.contrastive or "
                          "loss.multi_similarity; give one of them a weight, or set it to 0")
    if 0 < cfg.loss.xbm_size < cfg.train.batch_size:
        raise ConfigError(f"key 'loss.xbm_size' ({cfg.loss.xbm_size}) must hold at least one "
                          f"batch (train.batch_size={cfg.train.batch_size})")
    _check_numbers(cfg, "train.metrix_alpha", 0.0, 1e3)
    if cfg.train.metrix_alpha > 0 and not (memory_on or cfg.loss.recall_k > 0):
        raise ConfigError("key 'train.metrix_alpha' mixes for loss.contrastive, "
                          "loss.multi_similarity or loss.recall_k; give one of them a weight, or "
                          "set it to 0")


def validate(cfg: Config) -> None:
    """Checks that types alone cannot express."""
    for dotted, choices in CHOICES.items():
        value = cfg.get_path(dotted)
        if value not in choices:
            raise ConfigError(f"key '{dotted}' must be one of {', '.join(choices)}; got {value!r}")
    if cfg.train.epochs < 0:
        raise ConfigError(f"key 'train.epochs' must be 0 (no training: the untouched backbone) "
                          f"or more; got {cfg.train.epochs}")
    positive = ("data.img_size", "train.batch_size", "train.grad_accum",
                "folds.n_folds", "model.embed_dim", "embed.batch_size", "gpus",
                "model.subcenters", "train.pk_k", "model.glam_reduction")
    for dotted in positive:
        if cfg.get_path(dotted) < 1:
            raise ConfigError(f"key '{dotted}' must be at least 1; got {cfg.get_path(dotted)}")
    for dotted in ("aug.affine_p", "aug.color_p", "aug.blur_p", "aug.dropout_p", "aug.hflip",
                   "train.bg_blank_prob", "model.neck_dropout"):
        if not 0.0 <= cfg.get_path(dotted) <= 1.0:
            raise ConfigError(f"key '{dotted}' is a probability in [0, 1]; got "
                              f"{cfg.get_path(dotted)}")
    if not 0.0 < cfg.train.layer_decay <= 1.0:
        raise ConfigError(f"key 'train.layer_decay' must be in (0, 1]; got {cfg.train.layer_decay}")
    if not 0.0 < cfg.train.ema_decay < 1.0:
        raise ConfigError(f"key 'train.ema_decay' must be in (0, 1); got {cfg.train.ema_decay}")
    if cfg.model.dynamic_margin and cfg.model.arcface_m_min > cfg.model.arcface_m:
        raise ConfigError(f"key 'model.arcface_m_min' ({cfg.model.arcface_m_min}) must not exceed "
                          f"model.arcface_m ({cfg.model.arcface_m}), the rarest identity's margin")
    _validate_pseudo_and_student(cfg)
    _validate_losses(cfg)
    if cfg.train.sampler == "pk" and cfg.train.batch_size % cfg.train.pk_k:
        raise ConfigError(f"key 'train.batch_size' ({cfg.train.batch_size}) must be a multiple of "
                          f"train.pk_k ({cfg.train.pk_k}) with train.sampler=pk")
    if cfg.folds.n_folds < 2:
        raise ConfigError(f"key 'folds.n_folds' must be at least 2; got {cfg.folds.n_folds}")
    fill = cfg.data.fill
    if len(fill) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in fill):
        raise ConfigError(f"key 'data.fill' must be 3 integers in 0..255; got {fill!r}")
    for dotted in ("data.mean", "data.std"):
        value = cfg.get_path(dotted)
        if value == AUTO:
            continue
        if not isinstance(value, list) or len(value) != 3 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"key '{dotted}' must be auto or a list of 3 numbers; got "
                              f"{value!r}")
        if dotted == "data.std" and min(value) <= 0:
            raise ConfigError(f"key 'data.std' must be positive numbers; got {value!r}")
    workers = cfg.data.num_workers
    if workers != AUTO and not (isinstance(workers, int) and workers >= 0):
        raise ConfigError(f"key 'data.num_workers' must be auto or a whole number >= 0; got "
                          f"{workers!r}")
    if not cfg.exp or "/" in cfg.exp or cfg.exp in (".", ".."):
        raise ConfigError(f"key 'exp' must be a plain folder name; got {cfg.exp!r}")
    _validate_post(cfg)


VIEW_PATTERN = re.compile(r"^(orig|flip|(flip_)?zoom(\d+(\.\d*)?|\.\d+))$")


def check_view(view: Any, key: str) -> str:
    """A test-time view name: orig | flip | zoom<f> | flip_zoom<f>, with 0.5 <= f <= 2."""
    if not isinstance(view, str) or not VIEW_PATTERN.match(view):
        raise ConfigError(f"key '{key}': view {view!r} is not one of orig, flip, zoom<f>, "
                          "flip_zoom<f> (e.g. zoom1.15)")
    if "zoom" in view and not 0.5 <= float(view.split("zoom")[1]) <= 2.0:
        raise ConfigError(f"key '{key}': view {view!r} zooms outside 0.5..2")
    return view


def _check_numbers(cfg: Config, dotted: str, low: float, high: float, kind: type = float) -> None:
    value = cfg.get_path(dotted)
    values = value if isinstance(value, list) else [value]
    for v in values:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and low <= v <= high
        if kind is int:
            ok = ok and isinstance(v, int)
        if kind is bool:
            ok = isinstance(v, bool)
        if not ok:
            what = "true/false" if kind is bool else f"{kind.__name__} in [{low}, {high}]"
            raise ConfigError(f"key '{dotted}' expects {what}; got {v!r}")


def _validate_local(cfg: Config) -> None:
    """The local-verification keys (part of `validate`)."""
    for dotted in ("post.local", "tune.local"):
        _check_numbers(cfg, dotted, 0, 1, bool)
    big = 10 ** 6
    for dotted, low in (("local.top_b", 1), ("local.max_side", 16), ("local.max_keypoints", 1),
                        ("local.mask_erode", 0), ("local.min_matches", 4), ("local.workers", 1)):
        _check_numbers(cfg, dotted, low, big, int)
    _check_numbers(cfg, "local.ratio", 1e-6, 1.0)
    _check_numbers(cfg, "local.ransac_threshold", 1e-6, 1.0)


def _validate_post(cfg: Config) -> None:
    if not cfg.embed.tta:
        raise ConfigError("key 'embed.tta' needs at least one view (e.g. [orig])")
    for view in cfg.embed.tta:
        check_view(view, "embed.tta")
    for view in cfg.tune.views:
        check_view(view, "tune.views")
    for dotted in ("tune.qe_k", "tune.qe_alpha", "tune.dba", "tune.k1", "tune.k2",
                   "tune.lambda", "tune.blend", "tune.proto_weight", "tune.proto_scale",
                   "tune.rerank_norm"):
        if not cfg.get_path(dotted):
            raise ConfigError(f"key '{dotted}': the search grid needs at least one value")
    norms = CHOICES.get("post.rerank_norm")  # registered by retrieval.rerank once imported
    for norm in cfg.tune.rerank_norm:
        if norms and norm not in norms:
            raise ConfigError(f"key 'tune.rerank_norm' lists {norm!r}; each must be one of "
                              f"{', '.join(norms)}")
    big = 10 ** 6
    for dotted in ("post.qe_k", "post.dba_k", "tune.qe_k"):
        _check_numbers(cfg, dotted, 0, big, int)
    for dotted in ("post.k1", "post.k2", "tune.k1", "tune.k2"):
        _check_numbers(cfg, dotted, 1, big, int)
    for dotted in ("post.lambda", "post.blend", "post.proto_weight", "tune.lambda", "tune.blend",
                   "tune.proto_weight"):
        _check_numbers(cfg, dotted, 0.0, 1.0)
    for dotted in ("post.qe_alpha", "tune.qe_alpha", "post.proto_scale", "tune.proto_scale"):
        _check_numbers(cfg, dotted, 0.0, 1e6)
    _check_numbers(cfg, "tune.min_gain", -1.0, 1.0)  # negative: keep every step (forced)
    _check_numbers(cfg, "tune.per_identity", -1, 10 ** 6, int)
    _check_numbers(cfg, "tune.draws", 1, 1000, int)
    _check_numbers(cfg, "tune.noise", 0.0, 100.0)
    _check_numbers(cfg, "post.max_dense_gb", 0.0, 1e6)
    _check_numbers(cfg, "tune.dba", 0, 1, bool)
    _validate_local(cfg)
    _check_numbers(cfg, "submit.weights", 0.0, 1e6)
    experiment_names(cfg)
    if cfg.submit.weights and len(cfg.submit.weights) != len(experiment_names(cfg)):
        raise ConfigError(f"key 'submit.weights' has {len(cfg.submit.weights)} weight(s) for "
                          f"{len(experiment_names(cfg))} experiment(s) of exps="
                          f"{cfg.exps or cfg.exp!r}")


def experiment_names(cfg: Config) -> list[str]:
    """`exps=a,b,c` (an ensemble of experiments), else the one `exp`."""
    names = [n.strip() for n in str(cfg.exps).split(",") if n.strip()] if cfg.exps else [cfg.exp]
    for name in names:
        if "/" in name or name in (".", ".."):
            raise ConfigError(f"key 'exps': {name!r} is not a plain experiment folder name")
    if len(set(names)) != len(names):
        raise ConfigError(f"key 'exps' names an experiment twice: {cfg.exps!r}")
    return names


@functools.cache
def _schema() -> Config:
    return load_config([])


def schema() -> Config:
    """The defaults of `configs/default.yaml` (a fresh copy): where code that runs without a
    config (pure functions' keyword defaults) takes its defaults from."""
    return copy.deepcopy(_schema())


def schema_value(dotted: str) -> Any:
    """One default of the schema (a fresh copy of lists): a field default read per object,
    without copying the whole schema each time."""
    return copy.deepcopy(_schema().get_path(dotted))


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
