"""Configuration: pydantic models filled from packaged YAML presets, user YAML and overrides.

Each area defines its own pydantic model (`extra="forbid"`, so a typo in a config is an
error, not a silently ignored key) and keeps its presets in `diffmix/presets/<area>/NAME.yaml`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from diffmix.errors import ConfigError, describe_yaml_error

M = TypeVar("M", bound=BaseModel)


def preset_names(area: str) -> list[str]:
    """Names of the presets shipped for `area` (e.g. 'sdm', 'seg', 'experiment')."""
    folder = resources.files("diffmix") / "presets" / area
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; unreadable files and syntax errors are ConfigError (one line)."""
    path = Path(path)
    try:
        obj = yaml.safe_load(path.read_text())
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, so not a YAML config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML at {describe_yaml_error(exc)}") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return obj


def load_preset(area: str, name: str) -> dict[str, Any]:
    """The raw dict of a shipped preset; unknown names list the available ones."""
    res = resources.files("diffmix") / "presets" / area / f"{name}.yaml"
    if not res.is_file():
        raise ConfigError(
            f"unknown {area} preset {name!r}: choose one of {preset_names(area)} "
            "or pass a YAML file"
        )
    return yaml.safe_load(res.read_text()) or {}


def deep_update(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: nested mappings merge, everything else is replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def build_config(
    model: type[M],
    area: str,
    preset: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    drop_none: bool = True,
) -> M:
    """Resolve a config: preset (shipped name or YAML path), then `overrides`, validated.

    With `drop_none` (what CLIs want: an option left at None keeps the preset's value),
    top-level None overrides are ignored; pass False to set a key to None explicitly.
    Validation errors become ConfigError naming the offending keys.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if preset is not None:
        p = str(preset)
        if p.endswith((".yaml", ".yml")) or Path(p).is_file():
            data = read_yaml(p)
            source = p
        else:
            data = load_preset(area, p)
            source = f"{area} preset {p!r}"
    if overrides:
        data = deep_update(data, {k: v for k, v in overrides.items() if v is not None or not drop_none})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # our validators' messages are whole sentences: pydantic's "Value error, " adds nothing
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid {area} config ({source}): {problems}") from None


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a resolved config (what run folders store)."""
    return cfg.model_dump(mode="json")
