"""Settings as the command line gives them, below every module that takes one (the configs' helpers and the
command-line tools alike).

- ``monai.bundle run`` and fire pass ``--resume true`` on as the text ``'true'``, which Python takes for true
  whatever it says: ``as_bool`` reads it as what it says.
- ``monai.bundle run`` adds any ``--ID VALUE`` it is given as a new config id, so a typo (``--epoch 1`` for
  ``--epochs``) is silently ignored: ``refuse_unknown_overrides``, the first step of every run's ``initialize``,
  refuses it before any work.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import sys

__all__ = ["as_bool", "as_fraction", "as_names", "refuse_unknown_overrides"]


def _run_arguments() -> set:
    """The named parameters of ``monai.bundle run`` itself (``monai.bundle.scripts.run``, ``create_workflow`` and
    ``ConfigWorkflow``, which it hands them to): every other ``--ID`` of its command line is a config override."""
    # monai is imported where it is used, here and below: the command-line tools import this module for ``as_bool``
    # and check their flags before anything else, which should not wait the seconds monai takes to import
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run

    return {
        name
        for function in (run, create_workflow, ConfigWorkflow.__init__)
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is not parameter.VAR_KEYWORD and name != "self"
    }


def as_bool(value, name):
    """A flag's value as a bool. ``monai.bundle run`` and fire pass ``--resume true`` on as the text ``'true'``, and
    the text ``'false'`` is true to Python; so ``True``/``False``, ``1``/``0`` and the texts true/false, yes/no, 1/0
    (any case) are read as what they say, and anything else is refused.

    Args:
        value: the value given (from a config id or the command line).
        name: the flag's name, for the message.

    Returns:
        The bool.

    Raises:
        ValueError: ``--name must be true or false, got ...``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"--{name} must be true or false, got {value!r}")


def as_names(value) -> list:
    """A flag's list of names: ``"CT,CBF,CBV"`` (as fire passes it on) or a list or tuple, each name stripped."""
    names = value.split(",") if isinstance(value, str) else value
    return [str(name).strip() for name in names if str(name).strip()]


def as_fraction(value, name) -> float:
    """A threshold on a probability or a ratio as a float strictly between 0 and 1: at 0 or below every voxel passes
    it (a full mask), at 1 or above none does (an empty one), so such settings are refused before any work.

    Args:
        value: the value given (from a config id or the command line).
        name: the setting's name, for the message.

    Raises:
        ValueError: ``--name must lie strictly between 0 and 1 ...``.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} must be a number strictly between 0 and 1, got {value!r}") from None
    if not 0.0 < number < 1.0:
        raise ValueError(
            f"--{name} must lie strictly between 0 and 1, got {value!r}: at or below 0 every mask is full, at or"
            " above 1 every mask is empty"
        )
    return number


def _command_line_overrides(argv):
    """The config files and the ``--ID`` overrides of a ``python -m monai.bundle run ...`` command line."""
    overrides, config_file, args, own = [], None, argv[2:], _run_arguments()
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, _, value = arg[2:].partition("=")
        if key == "config_file":
            config_file = value or (args[i + 1] if i + 1 < len(args) else None)
        elif key not in own:
            overrides.append(key)
    if isinstance(config_file, str) and config_file.strip().startswith("["):
        config_file = ast.literal_eval(config_file)
    return config_file, overrides


def refuse_unknown_overrides(argv=None) -> None:
    """Refuse a ``monai.bundle run`` command line that overrides an id none of its config files defines, naming the
    nearest known id. A new id is added on purpose in a config file of one's own, put on ``--config_file``. Runs
    made in Python (``ConfigWorkflow(...)``) pass their settings by name and are not checked here.

    Args:
        argv: the command line, default ``sys.argv``; anything but ``monai.bundle``'s ``run`` is not checked.

    Raises:
        ValueError: ``--ID: no config of this run defines that id (the nearest: --...)``.
    """
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] != "run" or not argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
        return
    config_file, overrides = _command_line_overrides(argv)
    if not config_file or not overrides:
        return
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    unknown = [key for key in overrides if key.lstrip("+") not in parser]
    if unknown:
        ids = list(parser.get())
        near = {key: difflib.get_close_matches(key.split("#")[0], ids, n=1) for key in unknown}
        raise ValueError(
            "; ".join(
                f"--{key}: no config of this run defines that id"
                + (f" (the nearest: --{near[key][0]})" if near[key] else "")
                for key in unknown
            )
            + ". Add a new id in a config file of your own, on --config_file"
        )
