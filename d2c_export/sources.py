"""Where a model comes from: a native checkpoint, official LlamaGen/MAR files, or a preset with random weights.

A source is recorded in the manifest (`source_record`) so that the exact model can be rebuilt
(`model_from_source`) and so that every fix command names the export that rebuilds exactly what
was recorded (`export_command`).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from d2c_export.errors import BadInput, Setting, StaleEngines
from reference.checkpoint import checkpoint_sha256, load_checkpoint
from reference.model import D2C, D2CConfig, get_config
from reference.official import assemble, is_native

DEFAULT_OPSET = 18  # the ONNX opset an export writes unless told otherwise
RANDOM_WEIGHT_NOISE = 0.02  # std of the noise added to every parameter of a random-weight model
# The trained demo (scripts/train_demo.py): exported when neither a preset nor a checkpoint is named.
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "d2c-demo.safetensors"


SIZE_OPTIONS = ("mar_heads", "gpt_heads", "mar_patch_size")  # OfficialParts fields recorded as `--flag N`


@dataclass(frozen=True)
class OfficialParts:
    """The files and options beside a stage-2 checkpoint: LlamaGen's GPT, MAR's VAE, EMA choice, the sizes
    the weights cannot tell (head counts, MAR's patch size)."""

    gpt: Path | None = None
    vae: Path | None = None
    ema: bool = True
    mar_heads: int | None = None
    gpt_heads: int | None = None
    mar_patch_size: int | None = None

    @property
    def has_files(self) -> bool:
        return self.gpt is not None or self.vae is not None


@dataclass(frozen=True)
class ModelRequest:
    """What `d2c-export onnx` was asked to export: a preset (random weights), a checkpoint, or the demo."""

    config: str | None = None
    checkpoint: Path | None = None
    seed: int = 0
    parts: OfficialParts = OfficialParts()


def random_model(config: D2CConfig, seed: int) -> D2C:
    """The preset's own initialisation, then N(0, 0.02) on every parameter, all seeded.

    The noise makes zero-initialised layers (the head's AdaLN and output layers) non-zero, so random
    weights exercise every path of every stage, as the official fixtures do.
    """
    torch.manual_seed(seed)
    model = D2C(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * RANDOM_WEIGHT_NOISE)
    return model


def build_model(request: ModelRequest) -> tuple[D2C, dict]:
    """The model of `request` (eval mode) and its source record for the manifest.

    A checkpoint is a native checkpoint or an official stage-2 file (MAR, or D2C in MAR's layout), with the
    official parts adding or replacing pieces (`reference.official.assemble`); a preset gets seeded random
    weights; neither given: the trained demo checkpoint `DEMO_CHECKPOINT`.
    """
    if request.checkpoint is not None:
        if request.config is not None:
            raise BadInput("give either ", Setting("config"), " or ", Setting("checkpoint"), ", not both")
        path = Path(request.checkpoint).resolve()
        if not request.parts.has_files and is_native(path):
            return load_checkpoint(path), {"checkpoint": str(path), "sha256": checkpoint_sha256(path)}
        return official_model(path, request.parts)
    if request.parts.has_files:
        raise BadInput(Setting("gpt"), " and ", Setting("vae"), " go with ", Setting("checkpoint"), " (the stage-2 "
                       "file), e.g. `", Setting("checkpoint", "checkpoint-last.pth"), " ", Setting("vae", "kl16.ckpt"),
                       "`")
    if request.config is None:
        if not DEMO_CHECKPOINT.is_file():
            raise BadInput(f"the demo checkpoint {DEMO_CHECKPOINT} is missing; train it with "
                           "`python scripts/train_demo.py`, or pass ", Setting("config", "PRESET"), " / ",
                           Setting("checkpoint", "PATH"))
        return build_model(ModelRequest(checkpoint=DEMO_CHECKPOINT))
    return random_model(get_config(request.config), request.seed), {"random_init_seed": request.seed}


def official_model(stage2: str | Path, parts: OfficialParts = OfficialParts()) -> tuple[D2C, dict]:
    """A D2C assembled from official files, and its source: every input file with its sha256, and the options."""
    files = {role: Path(p).resolve() for role, p in (("stage2", stage2), ("gpt", parts.gpt), ("vae", parts.vae))
             if p is not None}
    model = assemble(files["stage2"], files.get("gpt"), files.get("vae"), ema=parts.ema, mar_heads=parts.mar_heads,
                     gpt_heads=parts.gpt_heads, mar_patch_size=parts.mar_patch_size)
    source = {"official": {role: {"path": str(p), "sha256": checkpoint_sha256(p)} for role, p in files.items()},
              "ema": parts.ema, **{k: getattr(parts, k) for k in SIZE_OPTIONS}}
    return model, source


def _official_parts(source: dict) -> OfficialParts:
    files = source["official"]
    return OfficialParts(gpt=files["gpt"]["path"] if "gpt" in files else None,
                         vae=files["vae"]["path"] if "vae" in files else None, ema=source.get("ema", True),
                         **{k: source.get(k) for k in SIZE_OPTIONS})


def source_flags(source: dict, config_name: str) -> list[str]:
    """The `d2c-export onnx` flags that select the model of a recorded source."""
    if "official" in source:
        files, parts = source["official"], _official_parts(source)
        flags = ["--checkpoint", files["stage2"]["path"]]
        flags += [x for role in ("gpt", "vae") if role in files for x in (f"--{role}", files[role]["path"])]
        flags += [] if parts.ema else ["--no-ema"]
        flags += [x for k in SIZE_OPTIONS if source.get(k) is not None
                  for x in (f"--{k.replace('_', '-')}", str(source[k]))]
        return flags
    if "checkpoint" in source:
        return ["--checkpoint", source["checkpoint"]]
    return ["--config", config_name, "--seed", str(source["random_init_seed"])]


def export_command(source: dict, config_name: str, out: str | Path, *, fp16: bool = False,
                   max_batch: int | None = None, opset: int | None = None) -> str:
    """The `d2c-export onnx` command line that exports exactly the recorded model into `out` (defaults left out)."""
    parts = ["d2c-export", "onnx", "--stage", "all", *source_flags(source, config_name), "--out", str(out)]
    parts += ["--max-batch", str(max_batch)] if max_batch is not None else []
    parts += ["--opset", str(opset)] if opset not in (None, DEFAULT_OPSET) else []
    parts += ["--fp16"] if fp16 else []
    return shlex.join(parts)


def _check_recorded(path: Path, digest: str, what: str, fix: Callable[[], str]) -> None:
    if not path.is_file():
        raise StaleEngines(f"{what} {path} recorded in the manifest is missing; restore it or re-export with `{fix()}`")
    if checkpoint_sha256(path) != digest:
        raise StaleEngines(f"{what} {path} changed since export; re-export with `{fix()}`")


def model_from_source(config: D2CConfig, source: dict, fix: Callable[[], str]) -> D2C:
    """Rebuild the exact model a manifest was exported from; `fix()` makes the export command named when that fails."""
    if "official" in source:
        for role, record in source["official"].items():
            _check_recorded(Path(record["path"]), record["sha256"], f"{role} file", fix)
        model, _ = official_model(source["official"]["stage2"]["path"], _official_parts(source))
        if model.config.to_dict() != config.to_dict():
            raise StaleEngines(f"the files recorded in the manifest build {model.config.name!r}, not the exported "
                               f"{config.name!r}; re-export with `{fix()}`")
        return model
    if "checkpoint" in source:
        path = Path(source["checkpoint"])
        _check_recorded(path, source["sha256"], "checkpoint", fix)
        return load_checkpoint(path)
    if "random_init_seed" in source:
        return random_model(config, int(source["random_init_seed"]))
    raise StaleEngines(f"the manifest's source {source!r} names no model; re-export with `{fix()}`")
