"""Typed job configuration: defaults < YAML/JSON file < --set overrides < CLI flags.

Every job config is a frozen pydantic model with `extra="forbid"` and a
description on every field. Errors come back as one readable `ConfigError`
(exit 2) that names the key, what was expected and what came.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from common import storage
from common.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class JobConfig(BaseModel):
    """Base for job configs: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def read_config_file(uri: str) -> dict[str, Any]:
    """Load a YAML or JSON mapping from a path or URI."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise ConfigError(f"Config file {uri} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {uri} is not UTF-8 text") from None
    try:
        data = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Config file {uri} does not parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {uri} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_set(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], value parsed as YAML: numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lora.r=32")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value




def load_config(
    model: type[C],
    *,
    file: str | None = None,
    sets: tuple[str, ...] | list[str] = (),
    flags: dict[str, Any] | None = None,
) -> C:
    """Resolve a job config from its sources, later wins.

    `flags` are explicit CLI options; None values mean "not given" and are skipped.
    """
    data: dict[str, Any] = read_config_file(file) if file else {}
    origins: dict[str, str] = {}  # dotted key -> where it came from, when not the file
    for item in sets:
        path, value = parse_set(item)
        if value is not None and not isinstance(value, str) and _wants_text(model, path):
            value = item.split("=", 1)[1].strip()  # run_id=007 is the text 007, not the number 7
        set_path(data, path, value)
        origins[".".join(path)] = f"--set {item}"
    for key, value in (flags or {}).items():
        if value is None or value == ():
            continue
        set_path(data, key.split("."), list(value) if isinstance(value, tuple) else value)
        origins[key] = f"--{key.replace('_', '-')}"
    return validate(model, data, source=file, origins=origins)


def validate(model: type[C], data: dict[str, Any], source: str | None = None,
             origins: dict[str, str] | None = None) -> C:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(model, exc, source, origins)) from None


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str | None,
                            origins: dict[str, str] | None = None) -> str:
    def origin(loc: str) -> str:
        """' (from --set a.b=1)' when the key (or a parent) came from the command line, else the file."""
        parts = loc.split(".")
        for i in range(len(parts), 0, -1):
            if (hit := (origins or {}).get(".".join(parts[:i]))) is not None:
                return f" (from {hit})"
        return f" (in {source})" if source else ""

    lines = [f"Invalid {model.__name__}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _known_keys(model, [str(p) for p in err["loc"][:-1]])
            guess = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            lines.append(f"  - unknown key {loc!r}{origin(loc)}{hint} (allowed: {', '.join(sorted(known))})")
        elif kind == "missing":
            lines.append(f"  - {loc}: required, but not given")
        elif kind == "value_error":  # a validator's own message: it names the field and the value
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {msg}" if loc == "<root>" else f"  - {loc}: {msg}{origin(loc)}")
        else:
            got = err.get("input")
            got_s = repr(got) if not isinstance(got, dict | list) else type(got).__name__
            if len(got_s) > 80:
                got_s = got_s[:77] + "..."
            lines.append(f"  - {loc}: {err['msg']} (got {got_s}){origin(loc)}")
    return "\n".join(lines)


def _submodel(annotation: Any) -> Any:
    """`Sub` for a field typed Sub, Sub | None or list[Sub]; anything else as it is."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _annotation_at(model: type[BaseModel], path: list[str]) -> Any:
    """The type of the field at a dotted path through nested models (the model itself for []); None: no field."""
    current: Any = model
    for part in path:
        fields = getattr(_submodel(current), "model_fields", None)
        if not fields or part not in fields:
            return None
        current = fields[part].annotation
    return current


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    fields = getattr(_submodel(_annotation_at(model, path)), "model_fields", None)
    return list(fields) if fields else []


def _wants_text(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the field at `path` takes only text (str or str | None)."""
    annotation = _annotation_at(model, path)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(annotation) if a is not type(None)} == {str}
    return annotation is str


def dump(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON data (what goes into the manifest)."""
    return config.model_dump(mode="json")




# A key is secret-looking when it ENDS with one of these ("hf_token", "aws_secret_access_key"), so
# counts such as "max_new_tokens" stay visible in logs.
SECRET_KEY = re.compile(r"(secret|password|passwd|token|api_key|access_key|key_id|credentials?)$")


def redacted(data: Any) -> Any:
    """A copy safe to log: values of keys that look like secrets are masked."""
    if isinstance(data, dict):
        return {k: ("***" if SECRET_KEY.search(str(k).lower()) and v else redacted(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v) for v in data]
    return data


def json_schema_validator(schema: dict[str, Any] | str, key: str) -> Any:
    """A jsonschema validator for a config value that is a JSON schema: inline, or the path/URI of a .json
    file. A missing file, bad JSON or an invalid schema is a ConfigError naming `key`."""
    import jsonschema

    if isinstance(schema, str):
        try:
            schema = json.loads(storage.read_text(schema))
        except FileNotFoundError:
            raise ConfigError(f"{key}: {schema} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: {schema} is not JSON ({exc})") from None
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"{key} is not a valid JSON schema: {exc.message}") from None
    return cls(schema)
