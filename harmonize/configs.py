"""Typed configs: YAML files validated by pydantic models, with dotted overrides from the
command line (``--set train.steps=500``). Every problem is reported at once, naming its
key, before any image is read or network built."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and key."""


class Section(BaseModel):
    """A config section: unknown keys are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid")


def load_yaml_config(model: type[M], path: str | Path | None = None,
                     overrides: dict[str, Any] | None = None) -> M:
    """Read a YAML config (None: all defaults) and apply dotted-key overrides.

    A None override leaves the file's value in place (argparse defaults), so only flags
    actually given count.
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...)")
        _resolve_named_configs(raw, Path(path), source)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value, source)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        given = {k for k, v in (overrides or {}).items() if v is not None}
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "config"
            problem = f"{where}: {e['msg'].removeprefix('Value error, ')}"
            if e["type"] == "extra_forbidden":
                problem = f"{where}: unknown key{_did_you_mean(model, e['loc'])}"
            # say where the bad value came from: the command line or the file
            from_flags = any(g == where or g.startswith(where + ".") for g in given)
            problems.append(f"--set {problem}" if from_flags else f"{source}: {problem}")
        raise ConfigError("; ".join(problems)) from None


NAMED_CONFIG_KEY, CONFIG_SUFFIXES = "config", (".yaml", ".yml")


def _resolve_named_configs(node: Any, naming_file: Path, source: str) -> None:
    """A config that names another (``cyclegan: {config: ../cyclegan/quick.yaml}``) means
    a path relative to itself, as includes do everywhere, so a run works from any folder.
    Written relative to the working directory instead (older configs), it is still found
    when it exists there. Resolved in place to an absolute path, so the dumped config of a
    run reloads from anywhere."""
    if isinstance(node, list):
        for item in node:
            _resolve_named_configs(item, naming_file, source)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if (key == NAMED_CONFIG_KEY and isinstance(value, str)
                and value.endswith(CONFIG_SUFFIXES)):
            node[key] = str(_named_config(value, naming_file, source))
        else:
            _resolve_named_configs(value, naming_file, source)


def _named_config(value: str, naming_file: Path, source: str) -> Path:
    named = Path(value).expanduser()
    if named.is_absolute():
        return named
    beside = (naming_file.resolve().parent / named).resolve()
    if beside.is_file():
        return beside
    if named.is_file():  # relative to the working directory (older configs)
        return named.resolve()
    raise ConfigError(f"{source}: config: {value} not found; a config named inside a config "
                      f"is relative to the file that names it (looked for {beside})")


def _did_you_mean(model: type[BaseModel], loc: tuple) -> str:
    """' (did you mean train.steps?)' for a misspelt key, from the section's own fields."""
    import difflib

    section: Any = model
    for part in loc[:-1]:
        field = getattr(section, "model_fields", {}).get(part)
        section = getattr(field, "annotation", None) if field else None
        if section is None or not hasattr(section, "model_fields"):
            return ""
    names = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1])
    if close:
        return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"
    return f" (known: {', '.join(names)})"


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.steps=500'`` -> ("train.steps", 500); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=500")
    return key.strip(), yaml.safe_load(value)


def with_overrides(overrides: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """Add ``--set KEY=VALUE`` texts to flag overrides; --set wins over a flag."""
    out = dict(overrides)
    for text in texts:
        key, value = parse_override(text)
        out[key] = value
    return out


def dump_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config (what actually ran) next to the outputs."""
    data = config.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cannot set {key}: '{part}' is not a section")
    node[leaf] = value


def dotted(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested overrides as dotted keys: ``{"data": {"image_size": 32}}`` becomes
    ``{"data.image_size": 32}``, so a nested value (e.g. from ``--set
    cyclegan.set.data.image_size=32``) changes one key, not the whole section."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{name}."))
        else:
            out[name] = value
    return out
