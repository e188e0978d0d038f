"""The project's error for problems with engines, inputs and files: its message names the problem and the fix."""
from __future__ import annotations


class EngineError(RuntimeError):
    """A problem with the engines directory or a request; the message names it and the command that fixes it."""
