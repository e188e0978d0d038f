"""Settings declared once, as dataclass fields with metadata, and the one check of a request against a model.

A setting is a field of a settings dataclass (`reference.pipeline.SamplingParams`) whose metadata says what it
means and what values it takes:

    name: type = field(default=..., metadata={"help": "one line", "min": number | None, "max": number | None})

optionally with "choices" (the values of a str) and "min_exclusive" / "max_exclusive": True; `setting(...)` builds
such a field. `settings_of(cls)` reads them as `SettingSpec`s, from which the command line makes its flags
(`diffusion_steps` -> `--diffusion-steps`), the HTTP API its request fields, the manifest the settings it records,
and `check_settings` the checks. `check_request` is the one check of what a request asks of a model: its
classes, how many images one generation holds, their seeds, and the settings the model cannot run.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

from reference.errors import BadInput

if TYPE_CHECKING:
    from reference.model import D2CConfig

MAX_SEED = 2 ** 63 - 1  # a torch generator's seed; every image's seed (seed + i) must stay at or below it


def setting(default: Any, help: str, min: float | None = None, max: float | None = None, *,
            min_exclusive: bool = False, max_exclusive: bool = False, choices: Sequence[str] | None = None):
    """A dataclass field that is a setting (the same as writing `field(default=..., metadata={...})`)."""
    metadata: dict[str, Any] = {"help": help, "min": min, "max": max}
    if min_exclusive:
        metadata["min_exclusive"] = True
    if max_exclusive:
        metadata["max_exclusive"] = True
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class SettingSpec:
    """One setting as every front end sees it: its name, type, default, help line and the values it takes."""

    name: str
    kind: type  # float, int, str, bool or an Enum
    optional: bool  # None is a value of it (`gpt_cfg`: None means "as cfg")
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple[str, ...] | None = None  # the values of a str setting, or of an Enum's

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """`[1, 1000]`, `(0, 1]`, `>= 0`: the values the setting takes, or '' when any number goes."""
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            return (f"{'(' if self.min_exclusive else '['}{_number(lo)}, {_number(hi)}"
                    f"{')' if self.max_exclusive else ']'}")
        if lo is not None:
            return f"{'>' if self.min_exclusive else '>='} {_number(lo)}"
        if hi is not None:
            return f"{'<' if self.max_exclusive else '<='} {_number(hi)}"
        return ""

    def check(self, value: Any) -> None:
        """Refuse a value of the wrong type or outside the range (`BadInput` naming this setting)."""
        if value is None and self.optional:
            return
        if self.choices is not None:
            plain = value.value if isinstance(value, Enum) else value
            if plain not in self.choices:
                raise BadInput(f"must be one of {', '.join(self.choices)}, got {value!r}", setting=self.name)
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                raise BadInput(f"must be true or false, got {value!r}", setting=self.name)
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise BadInput(f"must be a number, got {value!r}", setting=self.name)
        if self.kind is int and not isinstance(value, numbers.Integral):
            raise BadInput(f"must be an integer, got {value!r}", setting=self.name)
        if not math.isfinite(value):
            raise BadInput(f"must be a finite number, got {value!r}", setting=self.name)
        too_low = self.min is not None and (value <= self.min if self.min_exclusive else value < self.min)
        too_high = self.max is not None and (value >= self.max if self.max_exclusive else value > self.max)
        if too_low or too_high:
            raise BadInput(f"must be {'in ' if self.min is not None and self.max is not None else ''}"
                           f"{self.range_text()}, got {_number(value)}", setting=self.name)


def _kind(annotation) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a field's annotation (`float`, `int | None`, an Enum)."""
    args = typing.get_args(annotation)
    if args:
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"a setting has one type (and maybe None), not {annotation}")
        return others[0], len(others) < len(args)
    return annotation, False


@lru_cache(maxsize=None)
def settings_of(cls: type) -> tuple[SettingSpec, ...]:
    """The settings of dataclass `cls`, in field order: every field with a "help" in its metadata."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        kind, optional = _kind(hints[f.name])
        choices = meta.get("choices")
        if choices is None and isinstance(kind, type) and issubclass(kind, Enum):
            choices = tuple(e.value for e in kind)
        out.append(SettingSpec(f.name, kind, optional, f.default, meta["help"], meta.get("min"), meta.get("max"),
                               bool(meta.get("min_exclusive")), bool(meta.get("max_exclusive")),
                               None if choices is None else tuple(choices)))
    return tuple(out)


def check_settings(obj) -> None:
    """Refuse the first setting of `obj` (a settings dataclass) that its metadata does not admit; an Enum setting
    given by its value (`"linear"`) becomes the Enum member."""
    for spec in settings_of(type(obj)):
        value = getattr(obj, spec.name)
        spec.check(value)
        if value is not None and issubclass(spec.kind, Enum) and not isinstance(value, spec.kind):
            setattr(obj, spec.name, spec.kind(value))


def check_request(config: D2CConfig, labels: Sequence[int], *, batch: int | None = None,
                  max_batch: int | None = None, seed: int | Sequence[int] | None = None, params=None,
                  too_many: Callable[[int], str] | None = None, other_classes: str | None = None) -> None:
    """Refuse what `config`'s model cannot generate, before any work: no class, a class out of range, more than
    `max_batch` images in one generation of `batch` (default: all of `labels`), an image seed past `MAX_SEED`
    (`seed`: image i's is seed + i, or one per image), settings the model cannot run (`params.check_for`).

    `too_many(images)` says what to do about a generation too large, in the words of the front end that asked (its
    flags, its re-export command); it is called only then. `other_classes` says, in the same words, how to get a
    model with other classes; it ends the message of a class out of range.
    """
    if not len(labels):
        raise BadInput("no class to generate; name at least one", setting="classes")
    bad = [c for c in labels if not 0 <= c < config.num_classes]
    if bad:
        raise BadInput(f"class {bad[0]} is out of range: this model has classes 0..{config.num_classes - 1}"
                       + (f"; {other_classes}" if other_classes else ""), setting="classes")
    images = len(labels) if batch is None else batch
    if max_batch is not None and images > max_batch:
        fix = too_many(images) if too_many is not None else \
            "generate fewer images per call, or re-export with a larger max batch"
        raise BadInput(f"{images} images in one batch exceed max batch {max_batch}; {fix}")
    if seed is not None:
        last = seed + len(labels) - 1 if isinstance(seed, numbers.Integral) else max(seed, default=0)
        if last > MAX_SEED:
            raise BadInput(f"image seeds (seed + i) must stay <= {MAX_SEED}, the last is {last}", setting="seed")
    if params is not None:
        params.check_for(config)
