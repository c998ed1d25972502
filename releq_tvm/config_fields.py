"""Settings dataclasses: each field carries its help, its command-line spelling and its valid values.

A settings dataclass (:class:`releq_tvm.search.config.SearchConfig`, the report's
:class:`~releq_tvm.report.build.ReportOptions`) is the one definition of its settings, CleanRL
style: :func:`setting` attaches to a field what a reader and the command line need,
:mod:`releq_tvm.config_cli` turns the fields into click options, and :func:`check_settings`
enforces the choices (a ``Literal`` type) and ranges on every instance, however it was made.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from releq_tvm.errors import ReleqError


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    cli: str | tuple[str, ...] | bool = True,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    parse: Callable[[str], Any] | None = None,
    path: Literal["file", "dir"] | None = None,
    multiple: bool = False,
    metavar: str | None = None,
    show: Callable[[Any], str] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its one-line ``help`` and how the command line spells it.

    ``cli``: True for ``--field-name`` (a bool field: ``--field-name`` when it defaults to False,
    ``--no-field-name`` when it defaults to True; the flag flips the default), an option name or
    names to spell it otherwise, False when it is no option (an argument, or derived). ``min`` and
    ``max`` bound a number (each element of a tuple), ``min_open`` excludes ``min``. ``parse`` turns
    the option's text into the value (default for tuples: a comma list). ``path``: the option
    names a file or a folder. ``multiple``: the option repeats (a Mapping field collects pairs).
    ``show``: the value as option text, when ``parse`` reads something other than the comma list
    :func:`command_args` writes by default.
    """
    metadata = {
        "help": help, "cli": cli, "min": min, "max": max, "min_open": min_open, "parse": parse,
        "path": path, "multiple": multiple, "metavar": metavar, "show": show,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def is_option(f: dataclasses.Field) -> bool:
    """True when the field is a command-line option (False: an argument, derived, or no setting)."""
    return f.metadata.get("cli", False) is not False


def option_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The option's names, the first one canonical (``()`` when the field is no option)."""
    cli = f.metadata.get("cli", False)
    if cli is False:
        return ()
    if isinstance(cli, str):
        return (cli,)
    if isinstance(cli, tuple):
        return cli
    flag = "--no-" if f.default is True else "--"
    return (flag + f.name.replace("_", "-"),)


def option_name(f: dataclasses.Field) -> str:
    """How an error message names the field: its option, else the field name."""
    return (option_names(f) or (f.name,))[0]


@functools.cache
def setting_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (``from __future__ import annotations`` leaves them strings)."""
    return typing.get_type_hints(cls)


def without_none(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); any other type -> (itself, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def choices_of(tp: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal`` type (optional or not); None for any other type."""
    base, _ = without_none(tp)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def describe_range(f: dataclasses.Field) -> str | None:
    """``"in (0, 1]"``, ``">= 1"``, ... for a bounded field; None when it has no bounds."""
    low, high, low_open = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("min_open")
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return None


def _in_range(value: float, f: dataclasses.Field) -> bool:
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and (value < low or (value == low and f.metadata.get("min_open"))):
        return False
    return high is None or value <= high


def check_model_shape(model: str | None, input_shape) -> None:
    """``--input-shape`` goes with ``--model`` alone: a registered network states its input shape."""
    if model is None and input_shape is not None:
        raise ReleqError("--input-shape goes with --model; a registered network's input shape is known")


def check_network_or_model(network: str | None, model: str | None, input_shape) -> None:
    """A command on one network takes a registered NET or ``--model`` (:func:`check_model_shape` too)."""
    check_model_shape(model, input_shape)
    if model is None and network is None:
        raise ReleqError("pass NET (see `releq-tvm networks`) or --model FILE for your own model")


def check_settings(obj: Any) -> None:
    """Raise a one-line :class:`ReleqError` for the first field of ``obj`` outside its choices or range."""
    hints = setting_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        choices = choices_of(hints[f.name])
        if choices is not None and value not in choices:
            raise ReleqError(f"{option_name(f)} must be one of {', '.join(choices)}; got {value!r}")
        valid = describe_range(f)
        if valid is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        bad = next((v for v in values if not _in_range(v, f)), None)
        if bad is not None:
            what = "every value of " + option_name(f) if isinstance(value, tuple) else option_name(f)
            raise ReleqError(f"{what} must be {valid}; got {bad:g}")


def field_default(f: dataclasses.Field) -> Any:
    """The value a field takes when it is not given (its default, or its factory's product; None if required)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def command_args(obj: Any, always: tuple[str, ...] = ()) -> list[str]:
    """The command-line options that rebuild ``obj``: every option field whose value differs from
    its default (and the fields named in ``always``), in field order; nested settings dataclasses
    that are no option themselves contribute their own fields. The inverse of the generated options."""
    args: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not is_option(f):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                args += command_args(value)
            continue
        default = field_default(f)
        same = value == default or (isinstance(value, (list, tuple)) and tuple(value) == default)
        if same and f.name not in always:
            continue
        name, show = option_names(f)[0], f.metadata.get("show")
        if isinstance(value, bool):
            args.append(name)  # the flag flips the default
        elif isinstance(value, typing.Mapping):
            for key, item in value.items():
                args += [name, f"{key}={item}"]
        elif f.metadata.get("multiple"):
            for item in value:
                args += [name, str(item)]
        elif show is not None:
            args += [name, show(value)]
        elif isinstance(value, (list, tuple)):
            args += [name, ",".join(str(v) for v in value)]
        else:
            args += [name, str(value)]
    return args


def check_rpc_options(rpc: str | None, tracker: str | None, key: str | None) -> None:
    """One-line :class:`ReleqError` unless the options name one server, one tracker + key, or neither."""
    if (tracker is None) != (key is None):
        raise ReleqError("--rpc-tracker and --rpc-key go together: the tracker hands out a device of that key")
    if rpc is not None and tracker is not None:
        raise ReleqError("pass --rpc HOST:PORT (one server) or --rpc-tracker HOST:PORT --rpc-key KEY, not both")


def host_port(text: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` split (one line naming ``option`` otherwise)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ReleqError(f"{option} {text!r} must look like HOST:PORT, e.g. 127.0.0.1:9090")
    return host, int(port)


def where_label(rpc: str | None = None, tracker: str | None = None, key: str | None = None) -> str:
    """Where a runner made with these options times code: ``local``, ``rpc://HOST:PORT`` or
    ``rpc-tracker://HOST:PORT/KEY``."""
    if tracker:
        return f"rpc-tracker://{tracker}/{key}"
    return f"rpc://{rpc}" if rpc else "local"


def parse_counts(text: str, option: str) -> tuple[int, ...]:
    """A comma list of positive integers (``"1,2,2"`` -> ``(1, 2)``, repeats dropped, in order), such
    as thread or worker counts; one line naming ``option`` otherwise."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ReleqError(f"{option} must be a comma list of positive integers such as 1,2; got {text!r}")
    return tuple(dict.fromkeys(values))
