"""Click options generated from a settings dataclass (:mod:`releq_tvm.config_fields`), and the way back.

``@settings_options(SearchConfig)`` adds one option per command-line field; the command then
rebuilds the dataclass with :func:`settings_from`. So a setting is spelled once, in its field:
its type gives the option's type (a ``Literal`` its choices, a bool a flag, a tuple a comma
list), its default the option's default, its metadata the help, name and range. The fields of
a nested settings dataclass (the report's accuracy protocol) become options of the same command.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

import click

from releq_tvm.config_fields import choices_of, field_default, is_option, option_names, setting_types, without_none


def _nested(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def option_fields(cls: type, only: Collection[str] | None = None) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every command-line field of ``cls``, nested settings flattened.

    ``only``: the field names a command offers (None: all of them).
    """
    found = []
    hints = setting_types(cls)
    for f in dataclasses.fields(cls):
        if _nested(hints[f.name]):
            found += option_fields(hints[f.name], only)
        elif is_option(f) and (only is None or f.name in only):
            found.append((f, hints[f.name]))
    return found


class _Text(click.ParamType):
    """Option text -> value through the field's parser (ValueError becomes click's bad-value error)."""

    def __init__(self, parse: Callable[[str], Any], name: str):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _comma_list(item: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise ValueError(f"expected a comma list of {item.__name__} such as 1,2; got {text!r}") from None

    return parse


def _number(base: type, meta: Mapping[str, Any]) -> click.ParamType:
    low, high = meta["min"], meta["max"]
    if low is None and high is None:
        return click.INT if base is int else click.FLOAT
    if base is int:
        return click.IntRange(low, high, min_open=meta["min_open"])
    return click.FloatRange(low, high, min_open=meta["min_open"])


def _option(f: dataclasses.Field, tp: Any) -> Callable:
    meta = f.metadata
    base, _ = without_none(tp)
    origin = typing.get_origin(base)
    default = field_default(f)
    kw: dict[str, Any] = {"help": meta["help"], "default": default, "show_default": True}
    if base is bool:
        kw.update(is_flag=True, flag_value=not default, show_default=False)
    elif choices_of(base) is not None:
        kw["type"] = click.Choice(choices_of(base))
    elif meta["parse"] is not None:
        kw["type"] = _Text(meta["parse"], "text")
    elif origin is tuple:
        kw["type"] = _Text(_comma_list(typing.get_args(base)[0]), "list")
    elif meta["path"] is not None:
        kw["type"] = click.Path(dir_okay=meta["path"] != "file", file_okay=meta["path"] != "dir")
    elif base in (int, float):
        kw["type"] = _number(base, meta)
    elif base is str or meta["multiple"]:
        kw["type"] = click.STRING
    else:
        raise TypeError(f"{f.name}: no command-line form for {tp}; give it parse= or cli=False")
    if meta["multiple"]:  # each value is one item; a Mapping field collects (key, value) pairs
        kw["multiple"] = True
        kw["default"] = tuple(default.items() if isinstance(default, Mapping) else default)
        if origin is Mapping:
            kw["callback"] = lambda ctx, param, pairs: dict(pairs)
    elif isinstance(default, tuple):
        kw["default"] = ",".join(str(v) for v in default)  # shown as typed, parsed like typed text
    if meta["metavar"]:
        kw["metavar"] = meta["metavar"]
    return click.option(*option_names(f), f.name, **kw)


def settings_options(cls: type, only: Collection[str] | None = None) -> Callable:
    """Decorator: one click option per command-line field of ``cls`` (see :func:`option_fields`)."""
    found = option_fields(cls, only)
    if only is not None and {f.name for f, _ in found} != set(only):
        raise TypeError(f"{cls.__name__} has no command-line fields {sorted(set(only) - {f.name for f, _ in found})}")

    def decorate(command: Callable) -> Callable:
        for f, tp in reversed(found):  # click lists options in decorator order, top first
            command = _option(f, tp)(command)
        return command

    return decorate


def settings_from(cls: type, values: Mapping[str, Any], **fixed: Any) -> Any:
    """``cls`` from a command's values by field name (nested settings built alike); absent fields keep their default."""
    hints = setting_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif _nested(hints[f.name]):
            kwargs[f.name] = settings_from(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)
