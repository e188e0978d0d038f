"""The options the commands share, each defined once, and what turns them into library values.

The sampling flags are made from `SamplingParams`' settings (`reference.settings`): one flag per setting
(`diffusion_steps` -> `--diffusion-steps`) with its help line, type and range, default unset. A sampling flag left
out takes the value the engines recorded for their model (the model's recommended settings), so
`d2c-run --engines DIR --class N` works on every exported model. The backend flag offers every registered backend
(`d2c_export.backends`) and `auto`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import click

from d2c_export.cli_support import Finite
from d2c_export.engines import DEFAULT_ENGINES, Engines
from d2c_export.backends import AUTO, Precision, backend_names
from d2c_export.stages import MAX_EXPORT_BATCH
from reference.files import check_output_file
from reference.model import D2CConfig
from reference.pipeline import SamplingParams
from reference.samplers import SAMPLER_SETS
from reference.settings import SettingSpec, settings_of

log = logging.getLogger("d2c")
QUIET_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")  # per-op chatter of the ONNX exporter's passes
SAMPLING_HELP = "Sampling flags left out take the engines' recommended settings for their model."


def setup_logging(quiet: bool) -> None:
    """Progress and results on stderr as plain lines (warnings only with `quiet`)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def options(*decorators: Callable) -> Callable:
    """Several click decorators as one, applied in the order given."""
    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return apply


def engines_option(fn=None, *, help_text: str = "exported engines directory"):
    option = click.option("--engines", "engines_dir", type=click.Path(path_type=Path), default=DEFAULT_ENGINES,
                          show_default=True, help=help_text)
    return option if fn is None else option(fn)


quiet_option = click.option("--quiet", is_flag=True, help="no progress display")


def setting_option(spec: SettingSpec) -> Callable:
    """The flag of one setting: its type and range from the setting, unset by default (the engines' value)."""
    if spec.choices is not None:
        kind = click.Choice(list(spec.choices))
    elif spec.kind is bool:
        return click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.name, default=None, help=spec.help)
    elif spec.kind is int:
        kind = click.IntRange(spec.min, spec.max, min_open=spec.min_exclusive, max_open=spec.max_exclusive)
    else:
        kind = Finite(spec.min, spec.max, min_open=spec.min_exclusive, max_open=spec.max_exclusive)
    return click.option(spec.flag, spec.name, type=kind, default=None, help=spec.help)


sampling_options = options(*(setting_option(s) for s in settings_of(SamplingParams)))


def given_settings(flags: dict) -> dict:
    """The sampling settings among a command's flags that were given (plain values: an Enum by its value)."""
    return {s.name: flags[s.name] for s in settings_of(SamplingParams) if flags.get(s.name) is not None}


def sampling_from(recommended: dict, config: D2CConfig, flags: dict) -> SamplingParams:
    """The model's recommended settings with the given flags over them, checked for the model (`config`)."""
    given = given_settings(flags)
    params = SamplingParams(**{**recommended, **given})
    params.check_for(config)
    log.info("sampling: %s (%s)", params.describe(),
             "the engines' recommended settings" + (f", with {', '.join(sorted(given))} given" if given else ""))
    return params


def engines_sampling(engines: Engines, flags: dict) -> SamplingParams:
    return sampling_from(vars(engines.sampling), engines.config, flags)


class BackendChoice(click.Choice):
    """`auto` or a registered backend, read from the registry when used (so a backend registered later is offered)."""

    def __init__(self):
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        return (AUTO, *backend_names())

    @choices.setter
    def choices(self, value) -> None:  # click.Choice's constructor sets it; the registry is the source
        pass


precision_option = click.option("--precision", type=click.Choice([p.value for p in Precision]),
                                default=Precision.FP32.value, show_default=True,
                                help="numeric precision of the stages (each backend runs some)")
backend_options = options(
    click.option("--backend", type=BackendChoice(), default=AUTO, show_default=True,
                 help="auto: the fastest backend whose files and hardware are here (TensorRT, else ONNX Runtime)"),
    precision_option,
)


def int_list(ctx, param, text: str) -> list[int]:
    """A click callback: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > MAX_EXPORT_BATCH:
        raise click.BadParameter(f"expected positive integers up to {MAX_EXPORT_BATCH}, got {text!r:.80}")
    return values


def sampler_sets(ctx, param, text: str | None) -> list[str] | None:
    """A click callback: names of `reference.samplers.SAMPLER_SETS`, comma-separated, the first the reference."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SAMPLER_SETS]
    if not names or unknown or len(set(names)) != len(names):
        raise click.BadParameter(f"expected distinct names from {', '.join(SAMPLER_SETS)}, got {text!r}")
    return names


samplers_option = click.option(
    "--samplers", callback=sampler_sets, help="compare named sets of sampler settings over the others, in one run "
    f"(from {', '.join(SAMPLER_SETS)}; the first is the reference, e.g. exact,anneal,lazy,fast)")


def checked_out(path: str | Path | None, flag: str | None = None) -> Path | None:
    """An output file path checked before any work (a regular file in a writable folder), or None; `flag` (the
    option that named it) starts the message."""
    return None if path is None else check_output_file(path, flag)
