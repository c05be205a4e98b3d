"""Declares command-line options that are also settable by SPIFFE_DELEGATE_* variables."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that names the option, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class Option:
    """One option: ``flag`` on the command line, ``env_prefix + FLAG`` in the environment."""

    flag: str
    help: str
    convert: Callable[[str], Any] = str
    default: Any = None
    repeatable: bool = False
    choices: Sequence[str] | None = None
    metavar: str | None = None
    required: bool = False
    shown: str | None = None  # the default as --help prints it, when str() of it is unclear

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def env_name(self, prefix: str) -> str:
        return prefix + self.dest.upper()


def _checked(option: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = option.convert(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        if option.choices is not None and value not in option.choices:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(option.choices)}")
        return value

    return convert


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option], env_prefix: str,
                environ: Mapping[str, str] | None = None) -> None:
    """Adds ``options``; a set environment variable becomes the option's default."""
    env = os.environ if environ is None else environ
    for option in options:
        name = option.env_name(env_prefix)
        default = option.default
        raw = env.get(name)
        if raw is not None and raw != "":
            try:
                if option.repeatable:
                    default = [_checked(option)(part.strip())
                               for part in raw.split(",") if part.strip()]
                else:
                    default = _checked(option)(raw)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"environment variable {name}: {exc}")
        required = option.required and raw is None
        listed = ", comma-separated" if option.repeatable else ""
        printed = option.shown if option.shown is not None else option.default
        shown = f" (default: {printed})" if printed not in (None, [], ()) else ""
        kwargs: dict[str, Any] = {
            "dest": option.dest,
            "type": _checked(option),
            "help": f"{option.help}{shown} [env {name}{listed}]",
            "metavar": option.metavar,
            "required": required,
        }
        if option.repeatable:
            # Flags replace the environment's list rather than appending to it.
            parser.add_argument(option.flag, action="append", default=None, **kwargs)
            parser.set_defaults(**{f"_env_{option.dest}": list(default or [])})
        else:
            parser.add_argument(option.flag, default=default, **kwargs)


def repeatable_values(args: argparse.Namespace, dest: str) -> list[Any]:
    """Flag values if any were given on the command line, else the environment's."""
    given = getattr(args, dest)
    env_values: list[Any] = getattr(args, f"_env_{dest}", [])
    return list(given) if given else env_values


def fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)
