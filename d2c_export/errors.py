"""The project's errors that are the user's to fix, by what a caller must tell apart; anything else is a bug.

`UserError` (from `reference.errors`) is the base: the command line prints one line and exits 2, the HTTP API
answers a 4xx or 503 naming the field. Its kinds:
- `BadInput`: a request, flag or file the program cannot use (a class out of range, a setting out of its range).
- `EngineError`: a problem with the engines directory or with running it; `StaleEngines` (files missing,
  changed or built from something older: the fix rebuilds them) and `BackendUnavailable` (a backend that cannot
  run here or on these engines) are the kinds callers act on.
- `NonFiniteOutput`: a generation whose images or latents are not finite, under the settings it names.
"""
from __future__ import annotations

from reference.errors import BadInput, Setting, UserError

__all__ = ["BadInput", "BackendUnavailable", "EngineError", "NonFiniteOutput", "Setting", "StaleEngines",
           "UserError", "one_line"]


class EngineError(UserError):
    """A problem with the engines directory or with running it; the message names it and the command that fixes it."""


class StaleEngines(EngineError):
    """Engine files that are missing, changed, of an older format or built from older files: rebuild them."""


class BackendUnavailable(EngineError):
    """A backend that cannot run here (no TensorRT, no GPU) or on these engines (its files were not built)."""


class NonFiniteOutput(UserError):
    """A generation that produced inf or NaN: `what` ("images", "latents") and the `settings` it ran with."""

    def __init__(self, what: str, settings: dict, *fix: str | Setting):
        shown = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
        super().__init__(f"generation produced non-finite {what} (inf/NaN) with {shown}", *fix)
        self.what, self.settings = what, dict(settings)


def one_line(text: object) -> str:
    """A message on one line (a multi-line message's lines joined by spaces)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())
