"""The one way the bundle's fire CLIs run: the command line checked against ``main``'s signature before ``main`` runs,
INFO logging, and bad input reported as one line instead of a traceback.

fire would call ``main`` first and complain about a flag it could not use only afterwards, when ``main`` has written
its output, and it passes ``--folds 2.5`` on as a float. So ``run`` refuses a flag that names no parameter of
``main`` (exit 2) and a value that does not fit the parameter's type annotation (exit 1) before ``main`` is called.
"""

import difflib
import functools
import inspect
import logging
import os
import re
import sys
import types
import typing

from scripts.flags import as_bool

HELP_FLAGS = ("-h", "--help")
# What fire takes for a flag: "--name", "-n", "-name" (a negative number such as "-5" is a value).
_FLAG = re.compile(r"^(--|-[a-zA-Z])")
_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a tuple",
    dict: "a dict",
    type(None): "None",
}


class UsageError(Exception):
    """A command line that does not fit ``main``'s signature (an unknown flag, an argument too many)."""


def _parameter_of_flag(flag, has_value, parameters):
    """The parameter of ``parameters`` that fire sets from ``flag`` (``--data-root``, ``-d``, ``--nocheck``), else
    ``None``.

    Args:
        flag: The flag as typed, without ``=value``.
        has_value: Whether fire takes the flag's value (from ``=value`` or the next argument) rather than reading the
            flag as ``True`` (or, as ``--noNAME``, ``False``).
        parameters: The names of ``main``'s parameters.

    Returns:
        The parameter's name, or ``None``.
    """
    key = flag.lstrip("-").replace("-", "_")
    if key in parameters:
        return key
    if not has_value and key.startswith("no") and key[2:] in parameters:
        return key[2:]
    if len(key) == 1:  # fire's shortcut: "-d" for the one parameter that starts with "d"
        shortcuts = [name for name in parameters if name[0] == key]
        if len(shortcuts) == 1:
            return shortcuts[0]
    return None


def check_command_line(args, parameters, prog):
    """Raise ``UsageError`` unless fire can give every argument of ``args`` to one of ``parameters``.

    Flags are read as fire reads them: ``--name=value``, ``--name value``, ``--name`` followed by another flag or at
    the end (``True``), ``--noname`` (``False``); other arguments fill the parameters not named by a flag, in order.

    Args:
        args: The command line, without the program and without fire's own flags (after a lone ``--``).
        parameters: The names of ``main``'s parameters, in order.
        prog: The program's name for the message.

    Raises:
        UsageError: For a flag that names no parameter (suggesting the closest name) and for an argument that no
            parameter is left for.
    """
    named, positional = set(), []
    index = 0
    while index < len(args):
        argument = args[index]
        if not _FLAG.match(argument):
            positional.append(argument)
            index += 1
            continue
        flag, has_equals, _ = argument.partition("=")
        is_last_or_before_flag = index + 1 == len(args) or _FLAG.match(args[index + 1])
        parameter = _parameter_of_flag(flag, has_equals or not is_last_or_before_flag, parameters)
        if parameter is None:
            close = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), parameters, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UsageError(
                f"unknown flag {flag} for {prog}{hint}; known flags: " + ", ".join(f"--{name}" for name in parameters)
            )
        named.add(parameter)
        index += 1 if has_equals or is_last_or_before_flag else 2
    unnamed = [name for name in parameters if name not in named]
    if len(positional) > len(unnamed):
        raise UsageError(
            f"unexpected argument {positional[len(unnamed)]!r} for {prog}: every parameter has a value"
            f" ({', '.join(f'--{name}' for name in parameters)})"
        )


def _annotated_types(annotation):
    """The types an annotation allows: ``int`` -> ``(int,)``, ``str | None`` -> ``(str, NoneType)``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(typing.get_origin(member) or member for member in typing.get_args(annotation))
    return (typing.get_origin(annotation) or annotation,)


def check_value(name, value, annotation):
    """Check a value fire parsed for parameter ``name`` against its annotation; fire parses ``2.5`` as a float,
    ``abc`` as a string, ``1`` as an int and ``True`` as a bool.

    A bool fits only ``bool`` (not ``int``), a float does not fit ``int``, a number given for a ``str`` parameter
    becomes its ``str()`` (fire reads ``--name 7`` as an int), and a ``bool`` parameter takes what ``as_bool`` reads
    (``--check false`` is the text ``'false'`` to fire).

    Args:
        name: The parameter's name, for the message.
        value: The value fire parsed.
        annotation: The parameter's type annotation (a type, or a union such as ``str | None``).

    Returns:
        ``value``, its ``str()`` for a number given for a ``str`` parameter, or ``as_bool(value)`` for a ``bool`` one.

    Raises:
        ValueError: ``--name must be an integer, got 2.5`` for a value the annotation does not allow.
    """
    allowed = _annotated_types(annotation)
    if any(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) for kind in allowed):
        return value
    if bool in allowed and isinstance(value, str):
        return as_bool(value, name)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    names = [_TYPE_NAMES[kind] for kind in allowed]
    expected = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
    raise ValueError(f"--{name} must be {expected}, got {value!r}")


def _with_checked_values(main):
    """``main`` behind a wrapper with its signature that checks each value against ``main``'s type annotations.

    Args:
        main: The CLI function; every parameter must have a type annotation, but a ``**kwargs`` one, whose values
            ``main`` checks itself (e.g. config overrides).

    Returns:
        The wrapper, for ``fire.Fire``.

    Raises:
        TypeError: If a parameter of ``main`` has no annotation of the types ``check_value`` knows.
    """
    signature = inspect.signature(main, eval_str=True)
    named = {name: p for name, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD}
    unchecked = [p.name for p in named.values() if not set(_annotated_types(p.annotation)) <= set(_TYPE_NAMES)]
    if unchecked:
        raise TypeError(
            f"{main.__module__}.{main.__name__}: {', '.join(unchecked)} need(s) a type annotation made of"
            f" {', '.join(kind.__name__ for kind in _TYPE_NAMES)}"
        )

    @functools.wraps(main)
    def checked_main(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name in named:
                bound.arguments[name] = check_value(name, value, named[name].annotation)
        return main(*bound.args, **bound.kwargs)

    return checked_main


def run(main):
    """``fire.Fire(main)`` on the command line, after checking it against ``main``'s signature.

    A flag that names no parameter of ``main`` (or an argument too many) exits 2 with ``error: unknown flag ...``
    before anything runs; a value that does not fit the parameter's annotation exits 1 with ``error: --folds must be
    an integer, got 2.5``; an ``OSError`` or ``ValueError`` from ``main`` (missing file, broken case, refused
    overwrite) exits 1 with ``error: <message>``, which names the case and the file. ``-h``/``--help`` anywhere
    shows fire's help and runs nothing.

    Args:
        main: The module's CLI function, with a type annotation on every parameter.
    """
    import fire
    from fire.parser import SeparateFlagArgs

    spec = main.__globals__.get("__spec__")
    prog = spec.name if spec else os.path.basename(sys.argv[0])  # "scripts.tools.prepare_datalist" under python -m
    checked_main = _with_checked_values(main)
    args = sys.argv[1:]
    if any(flag in args for flag in HELP_FLAGS):
        fire.Fire(checked_main, command=["--help"], name=prog)
        return
    main_args, _ = SeparateFlagArgs(args)  # fire's own flags (--trace, ...) come after a lone --
    parameters = inspect.signature(main).parameters
    try:
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):  # else main checks its other flags
            check_command_line(main_args, list(parameters), prog)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        fire.Fire(checked_main, command=args, name=prog)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
