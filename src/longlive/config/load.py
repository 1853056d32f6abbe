"""YAML loading, key placement mapping, command-line overrides and typed construction of `Config`.

The reference flattens the sections infra/algorithm/training/data/inference/logging/checkpoints
into one namespace and so accepts a key in any of them or at top level. We accept the same
placements (and the reference's legacy names), map each key onto its one canonical typed field,
and refuse conflicting duplicates.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import yaml

from longlive.config.errors import ConfigError
from longlive.config.schema import FLATTENED_SECTIONS, NESTED_SECTIONS, Config

logger = logging.getLogger(__name__)

Path_ = tuple[str, ...]


def _schema_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_names() -> set[str]:
    return set(FLATTENED_SECTIONS) | set(NESTED_SECTIONS)


def _build_flat_keys() -> dict[str, Path_]:
    """Flat key -> canonical path, for every key of the flattened sections and every top-level field."""
    hints = _hints(Config)
    table: dict[str, Path_] = {}
    for section in FLATTENED_SECTIONS:
        for f in _schema_fields(hints[section]):
            if f.name in table:
                raise AssertionError(f"schema bug: flat key {f.name!r} defined in two sections")
            table[f.name] = (section, f.name)
    for f in _schema_fields(Config):
        if f.name in _section_names():
            continue
        if f.name in table:
            raise AssertionError(f"schema bug: top-level key {f.name!r} also in a section")
        table[f.name] = (f.name,)
    return table


FLAT_KEYS: dict[str, Path_] = _build_flat_keys()

# Names written by the reference's normalize_config or older configs -> canonical path.
LEGACY_KEYS: dict[str, Path_] = {
    "log_iters": ("training", "save_interval"),
    "generate_interval": ("evaluation", "interval"),
    "vis_interval": ("evaluation", "interval"),
    "inference_num_frames": ("evaluation", "num_frames"),
    "vis_video_lengths": ("evaluation", "num_frames"),
    "vis_ema": ("evaluation", "use_ema"),
    "model_name": ("model_kwargs", "model_name"),
    "timestep_shift": ("model_kwargs", "timestep_shift"),
    "num_frame_per_block": ("model_kwargs", "num_frame_per_block"),
}


def _all_dotted_paths() -> list[str]:
    """Every canonical dotted field path (for suggestions)."""
    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in _schema_fields(cls):
            tp = _strip_optional(hints[f.name])
            path = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                walk(tp, path + ".")
            else:
                out.append(path)

    walk(Config, "")
    return out


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _suggest(name: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not close:
        # Try matching only the last component (e.g. 'inference.samplng_steps' vs 'sampling_steps').
        last = name.rsplit(".", 1)[-1]
        by_last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close_last = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)
        close = [by_last[close_last[0]]] if close_last else []
    return f" Did you mean '{close[0]}'?" if close else ""


def _where(source: str | None) -> str:
    return source or "<config>"


# ------------------------------------------------------------------------------------------------
# Placement mapping (raw YAML mapping -> canonical nested dict)
# ------------------------------------------------------------------------------------------------
class _Collector:
    """Collects (path -> value, origin) candidates and reports conflicting duplicates."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.values: dict[Path_, tuple[Any, str]] = {}
        self.present_sections: set[str] = set()
        self.issues: list[str] = []

    def add(self, path: Path_, value: Any, origin: str) -> None:
        if path in self.values:
            old, old_origin = self.values[path]
            if not _same_value(path, old, value):
                self.issues.append(
                    f"{_where(self.source)}: field '{'.'.join(path)}' is set twice with different values: "
                    f"{old!r} at '{old_origin}' and {value!r} at '{origin}'. Keep only one of them."
                )
                return
            # Keep the more informative value (a list over a scalar for evaluation.num_frames).
            if isinstance(value, list) and not isinstance(old, list):
                self.values[path] = (value, origin)
            return
        self.values[path] = (value, origin)

    def unknown(self, where: str, key: Any, candidates: Iterable[str]) -> None:
        shown = f"{where}.{key}" if where else str(key)
        close = difflib.get_close_matches(str(key), list(candidates), n=1, cutoff=0.6)
        hint = ""
        if close:
            path = FLAT_KEYS.get(close[0]) or LEGACY_KEYS.get(close[0])
            hint = f" Did you mean '{'.'.join(path) if path else close[0]}'?"
        self.issues.append(f"{_where(self.source)}: unknown field '{shown}'.{hint} Fix the spelling or remove it.")


def _same_value(path: Path_, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if path == ("evaluation", "num_frames"):
        # Legacy inference_num_frames (a scalar) is the first entry of vis_video_lengths.
        la = a if isinstance(a, list) else [a]
        lb = b if isinstance(b, list) else [b]
        short, long_ = (la, lb) if len(la) <= len(lb) else (lb, la)
        return len(short) == 1 and bool(long_) and long_[0] == short[0]
    return False


def _flat_candidates() -> list[str]:
    return sorted(set(FLAT_KEYS) | set(LEGACY_KEYS) | _section_names() | {"model"})


def _add_nested_section(col: _Collector, section: str, value: Any, origin_prefix: str) -> None:
    if value is None:
        optional = typing.get_origin(_hints(Config)[section]) is Union
        if optional:  # e.g. `adapter: null` = no LoRA
            col.add((section,), None, origin_prefix)
        else:  # an empty section (all keys commented out) means defaults
            col.present_sections.add(section)
        return
    if not isinstance(value, dict):
        col.issues.append(
            f"{_where(col.source)}: '{origin_prefix}' must be a mapping of fields, got {value!r}."
        )
        return
    col.present_sections.add(section)
    for k, v in value.items():
        col.add((section, str(k)), v, f"{origin_prefix}.{k}")


def _add_flat(col: _Collector, key: str, value: Any, origin: str, where: str) -> None:
    path = FLAT_KEYS.get(key) or LEGACY_KEYS.get(key)
    if path is None:
        col.unknown(where, key, _flat_candidates())
        return
    if path[0] == "model_kwargs":
        col.present_sections.add("model_kwargs")
    col.add(path, value, origin)


def normalize_mapping(raw: dict[str, Any], source: str | None = None) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Map a reference-style config mapping onto canonical nested form; returns (canon, origins, issues)."""
    col = _Collector(source)
    for key, value in raw.items():
        if not isinstance(key, str):
            col.issues.append(f"{_where(source)}: top-level key {key!r} is not a string.")
            continue
        if key in FLATTENED_SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                col.issues.append(f"{_where(source)}: section '{key}' must be a mapping of fields, got {value!r}.")
                continue
            for k, v in value.items():
                _add_flat(col, str(k), v, f"{key}.{k}", key)
        elif key in NESTED_SECTIONS:
            _add_nested_section(col, key, value, key)
        elif key == "model":
            # Legacy `model: {name, kwargs, num_frame_per_block}` section.
            if not isinstance(value, dict):
                col.issues.append(f"{_where(source)}: section 'model' must be a mapping, got {value!r}.")
                continue
            for k, v in value.items():
                if k == "name":
                    col.add(("model_kwargs", "model_name"), v, "model.name")
                elif k == "num_frame_per_block":
                    col.add(("model_kwargs", "num_frame_per_block"), v, "model.num_frame_per_block")
                elif k == "kwargs":
                    _add_nested_section(col, "model_kwargs", v, "model.kwargs")
                else:
                    col.unknown("model", k, ["name", "kwargs", "num_frame_per_block"])
            col.present_sections.add("model_kwargs")
        else:
            _add_flat(col, key, value, key, "")

    canon: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for section in col.present_sections:
        canon.setdefault(section, {})
    for path, (value, origin) in sorted(col.values.items(), key=lambda kv: len(kv[0])):
        _set_path(canon, path, value)
        origins[".".join(path)] = origin
    return canon, origins, col.issues


def _set_path(canon: dict[str, Any], path: Path_, value: Any) -> None:
    node = canon
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------
def _resolve_override_key(key: str) -> Path_ | None:
    parts = tuple(p for p in key.split(".") if p)
    if not parts:
        return None
    # Canonical dotted path through the dataclasses.
    cls: Any = Config
    ok = True
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            ok = False
            break
        names = {f.name: f for f in _schema_fields(cls)}
        if part not in names:
            ok = False
            break
        cls = _strip_optional(_hints(cls)[part])
    if ok:
        return parts
    if len(parts) == 2 and parts[0] in FLATTENED_SECTIONS:
        return FLAT_KEYS.get(parts[1]) or LEGACY_KEYS.get(parts[1])
    if len(parts) == 1:
        return FLAT_KEYS.get(parts[0]) or LEGACY_KEYS.get(parts[0])
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value`; the value is parsed as a YAML scalar or flow list/mapping."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected 'field.path=value' (e.g. 'inference.sampling_steps=2').")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc}). Quote strings with special characters.") from exc
    return key, value


def apply_overrides(canon: dict[str, Any], origins: dict[str, str], overrides: Sequence[str], source: str | None) -> None:
    """Apply `field.path=value` overrides to a canonical mapping (overrides win over the file)."""
    for text in overrides:
        key, value = parse_override(text)
        path = _resolve_override_key(key)
        if path is None:
            raise ConfigError(
                f"{_where(source)}: override {text!r}: unknown field '{key}'.{_suggest(key, _all_dotted_paths())} "
                f"Use a dotted path such as 'inference.sampling_steps'."
            )
        if path[0] in NESTED_SECTIONS and len(path) > 1 and not isinstance(canon.get(path[0]), dict):
            canon[path[0]] = {}
        _set_path(canon, path, value)
        origins[".".join(path)] = f"override '{text}'"


# ------------------------------------------------------------------------------------------------
# Typed construction
# ------------------------------------------------------------------------------------------------
class _TypeIssue(Exception):
    pass


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Union:
        args = typing.get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_describe(arg).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of fields"
    return str(tp)


class _Builder:
    def __init__(self, source: str | None, origins: dict[str, str]) -> None:
        self.source = source
        self.origins = origins
        self.issues: list[str] = []

    def _field_ref(self, path: str) -> str:
        origin = self.origins.get(path)
        if origin and origin != path:
            return f"field '{path}' (from {origin if origin.startswith('override') else repr(origin)})"
        return f"field '{path}'"

    def issue(self, path: str, text: str) -> None:
        self.issues.append(f"{_where(self.source)}: {self._field_ref(path)}: {text}")

    def build(self, cls: type, data: dict[str, Any], prefix: str) -> Any:
        hints = _hints(cls)
        fields = {f.name: f for f in _schema_fields(cls)}
        for key in data:
            if key not in fields:
                where = prefix.rstrip(".")
                cands = [f"{prefix}{n}" for n in fields]
                self.issues.append(
                    f"{_where(self.source)}: unknown field '{prefix}{key}'.{_suggest(f'{prefix}{key}', cands)} "
                    f"Valid fields of '{where}': {', '.join(sorted(fields))}."
                )
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in data:
                continue
            path = f"{prefix}{name}"
            try:
                kwargs[name] = self.coerce(data[name], hints[name], path, f.metadata)
            except _TypeIssue as exc:
                self.issue(path, str(exc))
        return cls(**kwargs)

    def coerce(self, value: Any, tp: Any, path: str, meta: Any) -> Any:
        out = self._coerce_type(value, tp, path, meta)
        choices = meta.get("choices") if meta else None
        if choices is not None and not isinstance(out, (list, dict)):
            if not any(out == c and type(out) is type(c) for c in choices):
                shown = ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else repr(c) for c in choices)
                raise _TypeIssue(f"{out!r} is not allowed; choose one of: {shown}.")
        lo, hi = (meta.get("min"), meta.get("max")) if meta else (None, None)
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            if lo is not None and out < lo:
                raise _TypeIssue(f"{out!r} is below the minimum {lo}.")
            if hi is not None and out > hi:
                raise _TypeIssue(f"{out!r} is above the maximum {hi}.")
        return out

    def _coerce_type(self, value: Any, tp: Any, path: str, meta: Any) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if origin is Union:
            args = typing.get_args(tp)
            if value is None:
                if type(None) in args:
                    return None
                raise _TypeIssue(f"expected {_describe(tp)}, got null.")
            for arm in args:
                if arm is type(None):
                    continue
                try:
                    return self._coerce_type(value, arm, path, meta)
                except _TypeIssue:
                    continue
            raise _TypeIssue(f"expected {_describe(tp)}, got {value!r} ({type(value).__name__}).")
        if value is None:
            raise _TypeIssue(f"expected {_describe(tp)}, got null. Set a value or remove the key to use the default.")
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise _TypeIssue(f"expected true or false, got {value!r} ({type(value).__name__}).")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise _TypeIssue(f"expected an integer, got {value!r} ({type(value).__name__}).")
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                # PyYAML reads '1e-5' (no dot) as a string; accept numeric text for number fields.
                try:
                    return float(value)
                except ValueError:
                    pass
            raise _TypeIssue(f"expected a number, got {value!r} ({type(value).__name__}).")
        if tp is str:
            if isinstance(value, str):
                return value
            raise _TypeIssue(f"expected a string, got {value!r} ({type(value).__name__}). Quote it in YAML.")
        if origin is list:
            (arg,) = typing.get_args(tp)
            if meta and meta.get("scalar_to_list") and not isinstance(value, (list, tuple)):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise _TypeIssue(f"expected {_describe(tp)}, got {value!r} ({type(value).__name__}).")
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(self._coerce_type(item, arg, f"{path}[{i}]", None))
                except _TypeIssue as exc:
                    raise _TypeIssue(f"item {i}: {exc}") from None
            return out
        if origin is dict or tp is dict:
            if isinstance(value, dict):
                return dict(value)
            raise _TypeIssue(f"expected a mapping, got {value!r} ({type(value).__name__}).")
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise _TypeIssue(f"expected a mapping of fields, got {value!r} ({type(value).__name__}).")
            return self.build(tp, value, path + ".")
        raise _TypeIssue(f"unsupported schema type {tp!r} (schema bug).")


def build_config(canon: dict[str, Any], origins: dict[str, str], source: str | None) -> tuple[Config, list[str]]:
    """Construct a typed `Config` from a canonical mapping; returns (config, issues)."""
    builder = _Builder(source, origins)
    cfg = builder.build(Config, canon, "")
    cfg.source = source
    cfg.origins = dict(origins)
    return cfg, builder.issues


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def config_from_dict(raw: dict[str, Any], source: str | None = None, overrides: Sequence[str] = (),
                     validate: bool = True) -> Config:
    """Build and validate a Config from a (reference-style or canonical) mapping plus overrides."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(source)}: the top level must be a mapping of sections and keys, got {type(raw).__name__}.")
    canon, origins, issues = normalize_mapping(raw, source)
    apply_overrides(canon, origins, list(overrides), source)
    cfg, build_issues = build_config(canon, origins, source)
    issues += build_issues
    if issues:
        raise ConfigError(issues, source)
    if validate:
        from longlive.config.validate import validate_config

        validate_config(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file, apply `field.path=value` overrides, type-check and validate it."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: config file not found. Check the path (cwd: {Path.cwd()}).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: invalid YAML{line}: {problem}.") from exc
    if raw is None:
        raise ConfigError(f"{source}: the file is empty; expected a mapping of sections (model_kwargs, data, inference, ...).")
    return config_from_dict(raw, source=source, overrides=overrides)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in _schema_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Canonical nested mapping of every schema field (bookkeeping attributes excluded)."""
    return _to_plain(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the canonical form of `cfg` as YAML (loads back to an equal Config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=None)
    path.write_text(text, encoding="utf-8")
    logger.info("wrote config to %s", path)
