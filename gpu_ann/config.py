"""TOML config files for every ``gpu-ann`` command: read, turned into flags, written back.

A config file holds a command's options by their flag names (``batch-size = 512`` or
``batch_size = 512``), optionally under a table named after the command (``[train]``). The values are
turned into command-line tokens placed *before* the user's own flags, so argparse checks them exactly
like flags and a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def read_toml(path: str | Path, command: str) -> dict[str, Any]:
    """The options for ``command`` in a TOML file: its top-level keys, or its ``[command]`` table.

    Keys whose value is a table (other commands' sections) are left out.

    Parameters
    ----------
    path : str or Path
        The config file (UTF-8).
    command : str
        The command whose table is used when the file has one.

    Returns
    -------
    dict
        Option name (as written in the file) to value.

    Raises
    ------
    ConfigError
        The file is missing or not valid TOML.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    if isinstance(data.get(command), dict):
        data = data[command]
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def config_to_argv(values: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Command-line tokens for ``values``, checked against ``parser``'s options.

    Keys may use dashes or underscores. A true/false option becomes its flag or nothing; a list
    becomes one comma-joined value; anything else its ``str()``.

    Parameters
    ----------
    values : dict
        Options, as :func:`read_toml` returns them.
    parser : argparse.ArgumentParser
        The command's parser; its optional arguments (except ``--help`` and ``--config``) are allowed.
    source : str
        Named in error messages (the file).

    Returns
    -------
    list of str
        Tokens to place before the user's own arguments.

    Raises
    ------
    ConfigError
        An unknown option, or a non-boolean value for a true/false option.
    """
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    argv: list[str] = []
    for key, value in values.items():
        dest = key.replace("-", "_")
        action = by_dest.get(dest)
        if action is None or dest == "config":
            known = ", ".join(sorted(d.replace("_", "-") for d in by_dest if d != "config"))
            raise ConfigError(f"{source}: unknown option {key!r}; this command takes: {known}")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
            # store_false flags (--no-header) are written as the positive key: header = false.
            if value == isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
            continue
        if isinstance(value, list) and action.nargs in ("+", "*"):
            argv += [flag, *(str(v) for v in value)]  # one token per element (e.g. recommend --items)
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)  # the comma-separated flags (--split, --hidden)
        argv += [flag, str(value)]
    return argv


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{value} cannot be written to TOML")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def to_toml(values: dict[str, Any], command: str) -> str:
    """A ``[command]`` table of the non-None values, readable back by :func:`read_toml`.

    Parameters
    ----------
    values : dict
        Option name (underscores are written as dashes) to bool, number, string, list or tuple.
    command : str
        The table's name.

    Returns
    -------
    str
        TOML text ending in a newline.

    Raises
    ------
    ConfigError
        A value is a non-finite float (inf or NaN).
    """
    lines = [f"[{command}]"]
    lines += [f"{key.replace('_', '-')} = {_toml_value(v)}" for key, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"
