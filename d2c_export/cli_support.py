"""The command line's plumbing: one-line errors for every project error, bad flag and interrupt; option types."""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
from typing import Callable

import click

from d2c_export.errors import EngineError
from d2c_export.targets import TargetError
from reference.checkpoint import CheckpointError
from reference.files import BusyError, OutputPathError

USER_ERRORS = (EngineError, CheckpointError, TargetError, OutputPathError, BusyError, ValueError, KeyError, OSError)


# The reference speaks its Python API in its messages (`assemble(stage2, gpt=..., vae=..., ema=...)`); the commands'
# errors name their own flags instead.
API_TO_FLAGS = {"stage2=PATH": "--checkpoint PATH", "gpt=PATH": "--gpt PATH", "vae=PATH": "--vae PATH",
                "ema=False": "--no-ema", "gpt_heads=N": "--gpt-heads N", "mar_heads=N": "--mar-heads N",
                "mar_patch_size=N": "--mar-patch-size N"}


def _as_flags(message: str) -> str:
    for api, flag in API_TO_FLAGS.items():
        message = message.replace(api, flag)
    return message


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


_TERMINATED = threading.Event()  # set by SIGTERM: the KeyboardInterrupt that follows is reported as a termination


def _interrupt_on_sigterm(signum, frame):
    _TERMINATED.set()
    raise KeyboardInterrupt  # (Ray's waits turn any interrupt into a plain KeyboardInterrupt: the event tells them apart)


def terminate_as_interrupt() -> None:
    """SIGTERM interrupts the main thread as Ctrl-C does, so a terminated command unwinds and cleans up the same way."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


def ensure_standard_streams() -> None:
    """Closed standard streams become /dev/null: a command whose stderr (or stdout) was closed still runs, and no
    file it opens can take descriptor 0, 1 or 2 (where writes meant for a terminal would land in it)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def run_handled(call: Callable[[], object]) -> int:
    """Run a command; a user error, a bad flag, an interrupt or SIGTERM becomes one line on stderr."""
    ensure_standard_streams()
    previous = signal.getsignal(signal.SIGTERM)
    _TERMINATED.clear()
    terminate_as_interrupt()
    try:
        rv = call()
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        print(f"error: {one_line(exc.format_message())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        if _TERMINATED.is_set():
            print("error: terminated (SIGTERM); nothing was written under a final name", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("error: interrupted; nothing was written under a final name", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, CheckpointError):
            message = _as_flags(str(message))
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Handled:
    """click's `main` with the project's error handling: returns the exit code, or exits with it standalone."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = run_handled(lambda: super(_Handled, self).main(args, prog_name, complete_var, standalone_mode=False,
                                                              **extra))
        if standalone_mode:
            sys.exit(code)
        return code


class Command(_Handled, click.Command):
    pass


class Group(_Handled, click.Group):
    command_class = Command


SEED = click.IntRange(min=0, max=2 ** 63 - 1)
THREADS = click.IntRange(min=0, max=1024)  # CPU threads of a backend (0: its default)


class OutputPath(click.Path):
    """click's Path for an output: an empty value is refused (as a path it would be the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value:
            self.fail("the output path is empty; name a file or directory to write", param, ctx)
        return super().convert(value, param, ctx)


class Finite(click.FloatRange):
    """A finite float within a range (click's FloatRange lets NaN through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value
