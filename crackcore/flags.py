"""Command-line flags made from the config dataclasses. A setting's flag, type, choices and
help are written once, on its field in crackcore.config (`setting(...)`), and every tool that
takes it (`python -m crackcore.fit`, `tune/run.py`) builds the same flag from that field.

A study's flags default to None (not given: the experiment file's value stands); a tool that
runs on the dataclass defaults alone (crackcore.fit) gives them as the flags' defaults."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from crackcore.sources import data_setting, parse_sources

# fields given as repeated NAME=PATH flags, and how their strings become the field's value
REPEATED = {"data": data_setting, "external": lambda specs: parse_sources(specs) if specs else None}


def add_flags(parser: argparse.ArgumentParser, cls: type, names: list[str], defaults: bool = False) -> None:
    """One flag per field of `cls` named in `names` (dest = the field's name), defaulting to the
    field's default when `defaults` (and saying so in the help), else to None."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = meta["help"] + (f" (default {default})" if defaults and default is not None else "")
        kwargs: dict[str, Any] = {"dest": name, "default": default if defaults and name not in REPEATED else None,
                                  "help": help_text}
        kind = hints[name]  # int for `int | None`, and so on: the one type a flag's text is converted to
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if name in REPEATED:
            kwargs.update(action="append", metavar=meta.get("metavar"))
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, **({"choices": meta["choices"]} if "choices" in meta else {}),
                          **({"metavar": meta["metavar"]} if "metavar" in meta else {}))
        parser.add_argument(meta.get("flag", "--" + name.replace("_", "-")), **kwargs)


def flag_values(a: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The fields' values as given on the command line (None: not given), NAME=PATH lists parsed."""
    return {name: REPEATED[name](getattr(a, name)) if name in REPEATED else getattr(a, name) for name in names}
