"""The one settings loader of both processes: a validated dataclass from a TOML file, the environment and flags.

Precedence: defaults < TOML file < environment (``{PREFIX}_{FIELD}``, e.g. ``EDGE_AGENT_BROKER``) <
command-line flags. Unknown keys in the file are refused, values are type-checked, and every error
names where the bad value came from.

Apart from any one settings class: the agent (:mod:`edge_agent.settings.agent`) and the hub
(:mod:`cloud_hub.settings`) load theirs with it, and their ``validate`` methods use its checks
(:func:`choice`, :func:`positive`, :func:`user_path`) and raise its :class:`SettingsError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from edge_agent import exits


class SettingsError(exits.Failure, ValueError):
    """A setting that is missing, unknown or invalid; ``field`` names it when one setting is at fault."""

    exit_code = exits.USAGE

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


S = TypeVar("S")


def user_path(name: str, value: str | Path) -> Path:
    """``value`` with ``~`` expanded; a SettingsError naming ``name`` when it cannot be (``~nosuchuser/x``,
    no home directory) or holds a NUL, instead of the RuntimeError/ValueError of pathlib, wherever it is used."""
    try:
        path = Path(value).expanduser()
    except RuntimeError as exc:
        raise SettingsError(f"{name} {str(value)!r}: {exc}", field=name) from exc
    if "\0" in str(path):
        raise SettingsError(f"{name} {str(value)!r} holds a NUL character", field=name)
    return path


def _coerce(name: str, value: Any, hint: Any, origin: str) -> Any:
    """Check/convert ``value`` to the field type ``hint``; strings from the environment are parsed."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        empty_env = isinstance(value, str) and value == "" and origin.startswith("env")
        if (value is None or empty_env) and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0], origin)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(x, str) for x in items):
            return tuple(x.strip() for x in items if x.strip())
    raise SettingsError(f"{origin}: {name} must be {getattr(hint, '__name__', hint)}, got {value!r:.80}")


def load_settings(
    cls: type[S], *, env_prefix: str, config: str | Path | None = None,
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None, other_env: Sequence[str] = (),
) -> S:
    """Build and validate ``cls`` (a dataclass) from file, environment and flags (flags win).

    ``flags`` values that are ``None`` mean "not given on the command line". Every error names where
    the bad value came from (the file, the variable, the flag). An environment variable with our
    prefix that is no setting (a typo) is reported through ``warn``; ``other_env`` lists the ones
    that are meant for something else (e.g. ``CLOUD_HUB_CONFIG``).
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config is not None:
        from_file, path = _file_values(config, fields, hints)
        values.update(from_file)
        origins.update({k: path for k in from_file})
    for name in fields:
        key = f"{env_prefix}_{name.upper()}"
        if key in environ:
            values[name] = _coerce(name, environ[key], hints[name], f"environment {key}")
            origins[name] = f"environment {key}"
    _warn_strays(environ, env_prefix, fields, other_env, warn)
    for name, value in (flags or {}).items():
        if name not in fields:
            raise SettingsError(f"unknown flag {name}")
        if value is not None:
            values[name] = _coerce(name, value, hints[name], f"--{name.replace('_', '-')}")
            origins[name] = f"--{name.replace('_', '-')}"
    try:
        settings = cls(**values)
    except TypeError as exc:
        raise SettingsError(str(exc)) from exc
    check = getattr(settings, "validate", None)
    if check is not None:
        try:
            check()
        except SettingsError as exc:
            origin = origins.get(exc.field or "")
            if origin is None:
                raise
            raise SettingsError(f"{origin}: {exc}", field=exc.field) from None
    return settings


def _file_values(config: str | Path, fields: set[str], hints: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The settings of a TOML file, coerced, and the file's name as their origin. A key that is no
    setting is refused rather than ignored: in a file it is a typo that would otherwise go unseen."""
    import tomllib  # only with a config file: 0.3 MB of anonymous memory otherwise (#27 §4)

    path = user_path("config file", config)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, not UTF-8 (TOML is UTF-8)
        raise SettingsError(f"config file {str(path)!r} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    unknown = set(data) - fields
    if unknown:
        close = {k: difflib.get_close_matches(k, sorted(fields), n=1, cutoff=0.75) for k in sorted(unknown)}
        if all(close.values()):  # a typo: the one line names the setting meant
            raise SettingsError(f"{path}: unknown setting(s) " + ", ".join(
                f"{k} (did you mean {m[0]}?)" for k, m in close.items()))
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(fields))}")
    return {k: _coerce(k, v, hints[k], str(path)) for k, v in data.items()}, str(path)


def _warn_strays(environ: Mapping[str, str], env_prefix: str, fields: set[str], other_env: Sequence[str],
                 warn: Callable[[str], None] | None) -> None:
    """A variable with our prefix that is no setting is only warned about, not refused: the environment
    is shared with whatever else runs, and ``other_env`` names those meant for something else."""
    known = {f"{env_prefix}_{name.upper()}" for name in fields} | set(other_env)
    strays = sorted(k for k in environ if k.startswith(f"{env_prefix}_") and k not in known)
    for stray in strays:
        close = difflib.get_close_matches(stray, sorted(known), n=1)
        if warn is not None:
            warn(f"ignoring environment variable {stray}: not a setting" +
                 (f" (did you mean {close[0]}?)" if close else ""))


def choice(name: str, value: str, allowed: tuple[str, ...], *, raw: str | None = None) -> None:
    """``value`` must be one of ``allowed``; the error shows ``raw`` (what the user wrote) if given."""
    if value not in allowed:
        got = value if raw is None else raw
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {got!r}", field=name)


def positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    if not (value > 0 or (zero_ok and value == 0)):  # NaN ("nan" in the environment) is neither
        raise SettingsError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}", field=name)


MAX_SECONDS = 1e9  # about 31 years: a wait past this is no setting (inf and 1e300 overflowed Python's waits)


def seconds(name: str, value: float, *, zero_ok: bool = False) -> None:
    """A time setting: :func:`positive`, and at most :data:`MAX_SECONDS` (``inf`` a traceback at start, ``1e300``
    a thread that died at its first wait)."""
    positive(name, value, zero_ok=zero_ok)
    if not value <= MAX_SECONDS:
        raise SettingsError(f"{name} must be at most {MAX_SECONDS:g} seconds (about 31 years), got {value!r}",
                            field=name)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # the log_level of the agent and of the hub
