"""Named YAML configs, merged in order, with dotted and regex overrides from the CLI.

`configs.yaml` holds named configs. `defaults` defines every key and, through
its values, every key's type; other named configs and command-line flags may
only change existing keys, and their values are coerced to the default's type.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CONFIGS_FILE = Path(__file__).resolve().parent.parent / "configs.yaml"

# Keys that accept a schedule string such as `linear(3e-3,1e-4,1e6)` besides a number.
SCHEDULABLE = ("actor_ent", "actor_grad_mix")
SCHEDULE_RE = re.compile(r"^linear\(\s*[-+.\deE]+\s*,\s*[-+.\deE]+\s*,\s*[-+.\deE]+\s*\)$")

# Allowed values of enumerated keys (a full-match pattern over dotted keys -> choices), checked when a
# config is built so a typo fails at start-up; the modules that use these keys take their choices from here.
CHOICES = {
    "precision": ("auto", "32", "16", "bf16"),
    "jit": ("auto", "true", "false"),
    "strategy": ("default", "mirrored", "multi_worker"),
    "envs_parallel": ("none", "thread", "process"),
    "clip_rewards": ("identity", "tanh", "sign"),
    "actor_grad": ("reinforce", "dynamics", "both", "auto"),
    "expl_behavior": ("greedy", "random", "plan2explore", "model_loss"),
    "disag_target": ("stoch", "deter", "embed", "feat", "prior"),
    "expl_model_loss": ("kl",),
    r".*\.act": ("elu", "relu", "swish", "tanh", "none"),
    r".*\.norm": ("none", "layer"),
    r"rssm\.std_act": ("softplus", "sigmoid", "sigmoid2"),
    r"actor\.dist": ("auto", "onehot", "trunc_normal"),
    r"replay\.sample": ("episode", "step"),
    r"dataset\.chunks": ("stream", "shared", "fresh"),
    r"dmc\.scalars": ("vector", "scalar"),
}

# Valid ranges of numeric keys (a full-match pattern over dotted keys -> test, what the value must be),
# checked with CHOICES when a config is built: a value that would train on NaN from the first update
# (a negative learning rate) or fail only after the prefill (batch 0) is refused at start-up instead.
# Every float must also be finite; lists are checked element by element, schedules at both ends.
_positive = (lambda v: v > 0, "a positive number")
_at_least_1 = (lambda v: v >= 1, "at least 1")
_non_negative = (lambda v: v >= 0, "at least 0")
_unit = (lambda v: 0 <= v <= 1, "in [0, 1]")
_half_open_unit = (lambda v: 0 < v <= 1, "in (0, 1]")
BOUNDS: dict[str, tuple[Callable[[float], bool], str]] = {
    r".*_opt\.lr": _positive,
    r".*_opt\.(eps|clip|wd)": _non_negative,
    r"discount|slow_target_fraction": _half_open_unit,
    r"discount_lambda|kl\.balance|actor_grad_mix|minatar\.sticky": _unit,
    r"imag_horizon|dataset\.(batch|length)|train_every|envs|action_repeat|slow_target_update|replay\.minlen"
    r"|disag_offset"
    r"|size|rssm\.(hidden|deter|stoch|ensemble)|(encoder|decoder)\.(cnn_depth|cnn_kernels|mlp_layers)|.*\.units":
        _at_least_1,
    r"steps|prefill|pretrain|train_steps|eval_eps|time_limit|train_time_limit|checkpoint_keep"
    r"|replay\.(capacity|maxlen)|rssm\.discrete|atari\.noops|kl\.free|loss_scales\..*|actor_ent"
    r"|expl_noise|eval_noise|.*\.min_std|expl_(intr|extr)_scale": _non_negative,
}

# Keys that are 'auto' or a boolean, stored as the strings 'auto', 'true' and 'false'.
AUTO_BOOLS = ("jit",)

# Flags handled by the loader itself, not config keys.
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class ConfigError(ValueError):
    """A user mistake in configs or flags; scripts print it as one line and exit 2."""


class Config(Mapping):
    """Immutable nested mapping with attribute access: `config.rssm.deter`."""

    def __init__(self, data: Mapping[str, Any] | None = None):
        items = {}
        for key, value in (data or {}).items():
            items[key] = Config(value) if isinstance(value, Mapping) else _freeze(value)
        object.__setattr__(self, "_data", items)

    def __getattr__(self, name: str) -> Any:
        # Private and dunder lookups (copy, pickle probe `__setstate__` before `_data` exists)
        # must not recurse into `_data`.
        if name.startswith("__") or name == "_data":
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is immutable; use config.update({...})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Config is immutable; use config.update({...})")

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        # Pickle (e.g. for env worker processes) and deepcopy rebuild from plain data.
        return (Config, (self.to_dict(),))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()})"

    def to_dict(self) -> dict[str, Any]:
        return {key: _thaw(value) for key, value in self._data.items()}

    def flat(self) -> dict[str, Any]:
        """Leaf values by dotted key, e.g. {'rssm.deter': 600}."""
        return _flatten(self.to_dict())

    def update(self, overrides: Mapping[str, Any]) -> Config:
        """Return a copy with overrides applied; keys may be dotted paths or regexes."""
        return _apply(self, overrides, self.flat())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """The config saved at `path`; an empty file gives an empty Config. A file that is not a YAML
        mapping raises ConfigError naming the file and the problem (one line)."""
        data = read_yaml(path)
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{path} must hold a mapping of config keys, not a YAML {type(data).__name__}")
        return cls(data or {})


def _freeze(value: Any) -> Any:
    """Lists become tuples and mappings Configs, at any depth, so nothing inside is mutable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    if isinstance(value, Mapping):
        return Config(value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of `_freeze`: plain dicts and lists, as YAML writes them."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_thaw(item) for item in value]
    return value


def _apply(config: Config, overrides: Mapping[str, Any], reference: Mapping[str, Any]) -> Config:
    """Apply overrides to `config`, coercing each value to the type of its key in `reference`.

    `build` passes the flattened defaults as reference, so a key keeps its type even after
    another named config emptied a list or set a schedule string.
    """
    flat = config.flat()
    for key, value in _flatten(overrides).items():
        for match in _matching_keys(key, flat):
            flat[match] = coerce(match, value, reference.get(match, flat[match]))
    return Config(_unflatten(flat))


NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _parse_numbers(value: Any) -> Any:
    """YAML reads `1e6` as a string; in defaults, such strings become numbers.

    Exponent literals without a fraction or negative exponent (`5e7`) are counts
    and become ints; all others (`1e-4`, `2.5e5`) become floats.
    """
    if isinstance(value, Mapping):
        return {key: _parse_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_parse_numbers(item) for item in value]
    if isinstance(value, str) and NUMBER_RE.match(value):
        if re.fullmatch(r"[-+]?\d+[eE]\+?\d+", value):
            return int(float(value))
        return float(value)
    return value


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _matching_keys(key: str, flat: Mapping[str, Any]) -> list[str]:
    if key in flat:
        return [key]
    close = difflib.get_close_matches(key, list(flat), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if re.escape(key) != key.replace(".", r"\."):  # contains regex syntax beyond dots
        try:
            pattern = re.compile(key)
        except re.error as exc:
            raise ConfigError(f"invalid key pattern '{key}': {exc}") from None
        matches = [name for name in flat if pattern.fullmatch(name)]
        if matches:
            return matches
        raise ConfigError(f"key pattern '{key}' matches no config key{hint}")
    raise ConfigError(f"unknown config key '{key}'{hint}")


def coerce(key: str, value: Any, default: Any) -> Any:
    """Convert `value` (a YAML value or a CLI string) to the type of `default`."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf in SCHEDULABLE:
        # A number or a schedule, whatever the current value is (it may already be a schedule).
        if isinstance(value, str) and SCHEDULE_RE.match(value.replace(" ", "")):
            return value.replace(" ", "")
        return _to_float(key, value)
    if isinstance(default, bool):
        return to_bool(key, value)
    if key in AUTO_BOOLS:
        return _to_auto_bool(key, value)
    if isinstance(default, int):
        return _to_int(key, value)
    if isinstance(default, float):
        return _to_float(key, value)
    if isinstance(default, str):
        if value is None or isinstance(value, (list, tuple, Mapping)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            value = [part for part in re.split(r"[,\s]+", value.strip("[]() ")) if part]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        proto = default[0] if default else ""
        return tuple(coerce(key, item, proto) for item in value)
    if default is None:
        return value
    raise ConfigError(f"{key}: unsupported default type {type(default).__name__}")


def _to_auto_bool(key: str, value: Any) -> str:
    """'auto', 'true' or 'false' from 'auto' or any true/false word (YAML's booleans too)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return "true" if to_bool(key, value) else "false"
    except ConfigError:
        raise ConfigError(f"{key}: expected auto, true or false, got {value!r}") from None


def to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        extra = " or a schedule like linear(3e-3,1e-4,1e6)" if key.rsplit(".", 1)[-1] in SCHEDULABLE else ""
        raise ConfigError(f"{key}: expected a number{extra}, got {value!r}") from None


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)  # exact, where float() would round integers above 2**53
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if not number.is_integer():
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return int(number)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in the file at `path` (None when empty); ConfigError, one line naming the file,
    when it is not text or not valid YAML."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a text file (binary data at byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: the problem and where it is."""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def read_named_configs(path: str | Path = CONFIGS_FILE) -> dict[str, dict[str, Any]]:
    try:
        named = read_yaml(path)
    except OSError as exc:
        raise ConfigError(f"cannot read configs file {path}: {exc}") from None
    if not isinstance(named, dict) or "defaults" not in named:
        raise ConfigError(f"configs file {path} must map names to configs and define 'defaults'")
    return named


def build(names: Sequence[str] = ("defaults",), overrides: Mapping[str, Any] | None = None,
          path: str | Path = CONFIGS_FILE) -> Config:
    """Merge named configs in order over `defaults`, then apply overrides."""
    named = read_named_configs(path)
    config = Config(_parse_numbers(named["defaults"]))
    types = config.flat()  # every later value is coerced to its key's type in defaults
    for name in names:
        if name == "defaults":
            continue
        if name not in named:
            choices = ", ".join(sorted(named))
            raise ConfigError(f"unknown config name '{name}'; choices: {choices}")
        if not isinstance(named[name] or {}, Mapping):
            raise ConfigError(f"named config '{name}' in {path} must map keys to values")
        config = _apply(config, named[name] or {}, types)
    config = _apply(config, overrides or {}, types)
    validate(config)
    return config


# Keys whose values are regular expressions (over observation or episode keys).
REGEX_KEYS = r"(encoder|decoder)\.(cnn|mlp)_keys|log_keys_(sum|mean|max)"
GPU_MEMORY_WORDS = ("all", "growth")


def gpu_memory_setting(value: Any) -> str | int:
    """`gpu_memory`: 'all', 'growth' or a limit in MiB (a positive integer); ConfigError otherwise."""
    text = str(value).strip().lower()
    if text in GPU_MEMORY_WORDS:
        return text
    if re.fullmatch(r"\d+", text) and int(text) > 0:
        return int(text)
    raise ConfigError(f"gpu_memory must be all, growth or a positive number of MiB, got {value!r}")


def validate(config: Config) -> None:
    """Refuse enumerated values outside CHOICES, numbers outside BOUNDS and broken regular expressions
    (ConfigError, one line)."""
    check_choices(config)
    check_values(config)
    gpu_memory_setting(config.get("gpu_memory", "all"))
    for key, value in config.flat().items():
        if re.fullmatch(REGEX_KEYS, key):
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"{key}: not a valid regular expression ({exc}), got {value!r}") from None


def check_choices(config: Config) -> None:
    """Refuse a value outside its key's CHOICES, naming the key and the valid values."""
    for key, value in config.flat().items():
        for pattern, choices in CHOICES.items():
            if re.fullmatch(pattern, key) and value not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(choices)}, got '{value}'")


def check_values(config: Config) -> None:
    """Refuse non-finite floats and numbers outside their key's BOUNDS, naming the key."""
    for key, value in config.flat().items():
        if isinstance(value, str) and key.rsplit(".", 1)[-1] in SCHEDULABLE and SCHEDULE_RE.match(value):
            start, end, duration = (float(part) for part in value[value.index("(") + 1:-1].split(","))
            if not math.isfinite(duration) or duration <= 0:
                raise ConfigError(f"{key}: the schedule's duration must be a positive finite number, got {value}")
            numbers = [start, end]
        else:
            numbers = list(value) if isinstance(value, (list, tuple)) else [value]
        numbers = [n for n in numbers if isinstance(n, (int, float)) and not isinstance(n, bool)]
        for number in numbers:
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        for pattern, (test, what) in BOUNDS.items():
            if re.fullmatch(pattern, key):
                for number in numbers:
                    if not test(number):
                        raise ConfigError(f"{key} must be {what}, got {value}")


def load_run(logdir: str | Path) -> Config:
    """A run's saved config.yaml over the current defaults (keys added since the run keep their defaults)."""
    path = Path(logdir).expanduser() / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no config.yaml in {logdir}; is it a training logdir?")
    saved = Config.load(path)
    if not saved:  # everything would silently be the defaults, which most likely built another agent
        raise ConfigError(f"{path} is empty; it must hold the run's config (train.py writes it)")
    return build(["defaults"], saved.to_dict())
