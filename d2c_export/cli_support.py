"""The command line's plumbing: one-line errors for every project error, bad flag and interrupt; option types.

A `UserError` names the settings it is about by their Python names (`reference.errors`); here they are spelled as
the command's own flags (`stage2` -> `--checkpoint`, `ema=False` -> `--no-ema`, `diffusion_steps` ->
`--diffusion-steps`), found among the options the command declares.
"""
from __future__ import annotations

import math
import sys
from typing import Callable

import click

from d2c_export.errors import UserError, one_line
from reference.errors import Spelling, python_spelling
from reference.settings import MAX_SEED



def flag_spelling(command: click.Command) -> Spelling:
    """How `command` (and its subcommands) spells a setting: the first name of the option that declares it, with the
    value (`--vae PATH`; a flag pair's `--no-ema` for False); a setting no option declares keeps its Python name."""
    found: dict[str, click.Option] = {}
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        for p in cmd.params:
            if isinstance(p, click.Option):
                for name in [p.name, *(o.lstrip("-").replace("-", "_") for o in p.opts)]:
                    found.setdefault(name, p)

    def spell(name: str, value: object = None) -> str:
        option = found.get(name)
        if option is None:
            return python_spelling(name, value)
        if value is None:
            return option.opts[0]
        if isinstance(value, bool) and option.secondary_opts:
            return option.opts[0] if value else option.secondary_opts[0]
        return f"{option.opts[0]} {value}"
    return spell


def run_handled(call: Callable[[], object], spell: Callable[[], Spelling] = lambda: python_spelling) -> int:
    """Run a command; an error that is the user's to fix (a `UserError`, a bad flag, an operating-system error on a
    named file), or an interrupt, becomes one line on stderr, settings spelled as `spell()` writes them. Anything
    else is a bug and propagates with its traceback."""
    try:
        rv = call()
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        print(f"error: {one_line(exc.format_message())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("error: interrupted; nothing was written under a final name", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"error: {one_line(exc.render(spell()))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named: a bug, with its traceback
            raise
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2


class _Handled:
    """click's `main` with the project's error handling: returns the exit code, or exits with it standalone."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = run_handled(lambda: super(_Handled, self).main(args, prog_name, complete_var, standalone_mode=False,
                                                              **extra), lambda: flag_spelling(self))
        if standalone_mode:
            sys.exit(code)
        return code


class Command(_Handled, click.Command):
    pass


class Group(_Handled, click.Group):
    command_class = Command


class Seed(click.IntRange):
    """A generator seed, 0 to 2^63 - 1 (shown so in help)."""

    name = "seed"

    def __init__(self):
        super().__init__(min=0, max=MAX_SEED)

    def _describe_range(self) -> str:
        return "0<=x<=2^63-1"


SEED = Seed()


class Finite(click.FloatRange):
    """A finite float within a range (click's FloatRange lets NaN through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value
