"""Errors that are the user's to fix, and how a message names the settings it is about.

`UserError` is the base of every error whose cause is the input (a setting out of range, a bad file, a busy
directory) rather than the code: the command line shows it as one line, the HTTP API as a 4xx, and anything
else that escapes is a bug and shows as one. A message never spells a setting itself: the error carries the
setting at fault (`setting`) and `Setting` mentions of the others its fix uses, and each front end names them
its own way (`--diffusion-steps` on the command line, `diffusion_steps` in JSON, `vae=PATH` in Python).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Spelling = Callable[[str, object], str]  # (setting, value or None) -> how a front end writes it


@dataclass(frozen=True)
class Setting:
    """A mention of a setting inside a message: `Setting("vae", "PATH")` reads `vae=PATH` in Python."""

    name: str
    value: object = None


def python_spelling(name: str, value: object = None) -> str:
    """Keyword arguments, as the Python functions take them (`gpt=PATH`, `ema=False`)."""
    return name if value is None else f"{name}={value}"


def spelled(*parts: str | Setting, spell: Spelling = python_spelling) -> str:
    """Text and `Setting` parts as one string, each setting as `spell` writes it."""
    return "".join(spell(p.name, p.value) if isinstance(p, Setting) else str(p) for p in parts)


class UserError(Exception):
    """An error that is the user's to fix: a message of text and `Setting` parts, and the setting at fault."""

    def __init__(self, *parts: str | Setting, setting: str | None = None):
        super().__init__(*parts)
        self.setting = setting

    def render(self, spell: Spelling = python_spelling) -> str:
        """The message with every setting named by `spell`; the setting at fault first (`cfg: must be ...`)."""
        text = spelled(*self.args, spell=spell)
        return f"{spell(self.setting, None)}: {text}" if self.setting else text

    def __str__(self) -> str:
        return self.render()

    def __reduce__(self):  # keyword state survives pickling (errors cross process boundaries on Ray)
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type, args: tuple, state: dict) -> UserError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class BadInput(UserError, ValueError):
    """Input the program cannot use: a setting out of range, an unknown class, a file of the wrong kind."""
