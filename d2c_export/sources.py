"""Where a model comes from: a native checkpoint, official LlamaGen/MAR files, or a preset with random weights."""
from __future__ import annotations

from pathlib import Path

import torch

from d2c_export.manifest import EngineError
from reference.checkpoint import checkpoint_sha256, load_checkpoint
from reference.model import D2C, D2CConfig, get_config
from reference.official import assemble, is_native

RANDOM_WEIGHT_NOISE = 0.02  # std of the noise added to every parameter of a random-weight model
# The trained demo (scripts/train_demo.py): exported when neither a preset nor a checkpoint is named.
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "d2c-demo.safetensors"


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


def model_from_args(config: str | None, checkpoint: str | Path | None, seed: int = 0, *,
                    gpt: str | Path | None = None, vae: str | Path | None = None, ema: bool = True,
                    mar_heads: int | None = None, gpt_heads: int | None = None) -> tuple[D2C, dict]:
    """The model for `d2c-export`: a checkpoint when given, else preset `config` with seeded random weights,
    else (neither given) the trained demo checkpoint `DEMO_CHECKPOINT`.

    `checkpoint` is a native checkpoint or an official stage-2 file (MAR, or D2C in MAR's layout);
    `gpt` (LlamaGen) and `vae` (MAR's KL VAE) add or replace parts (`reference.official.assemble`).
    Returns the model (eval mode) and its source record for the manifest.
    """
    if checkpoint is not None:
        path = Path(checkpoint).resolve()
        if gpt is None and vae is None and is_native(path):
            model = load_checkpoint(path)
            return model, {"checkpoint": str(path), "sha256": checkpoint_sha256(path)}
        return official_model(path, gpt, vae, ema, mar_heads, gpt_heads)
    if gpt is not None or vae is not None:
        raise ValueError("--gpt and --vae go with --checkpoint (the stage-2 file), e.g. "
                         "`--checkpoint checkpoint-last.pth --vae kl16.ckpt`")
    if config is None:
        if not DEMO_CHECKPOINT.is_file():
            raise ValueError(f"the demo checkpoint {DEMO_CHECKPOINT} is missing; train it with "
                             "`python scripts/train_demo.py`, or pass --config PRESET / --checkpoint PATH")
        return model_from_args(None, DEMO_CHECKPOINT)
    return random_model(get_config(config), seed), {"random_init_seed": seed}


def official_model(stage2: str | Path, gpt: str | Path | None = None, vae: str | Path | None = None,
                   ema: bool = True, mar_heads: int | None = None, gpt_heads: int | None = None) -> tuple[D2C, dict]:
    """A D2C assembled from official files, and its source: every input file with its sha256, and the options."""
    files = {role: Path(p).resolve() for role, p in (("stage2", stage2), ("gpt", gpt), ("vae", vae)) if p is not None}
    model = assemble(files["stage2"], files.get("gpt"), files.get("vae"), ema=ema, mar_heads=mar_heads,
                     gpt_heads=gpt_heads)
    source = {"official": {role: {"path": str(p), "sha256": checkpoint_sha256(p)} for role, p in files.items()},
              "ema": ema, "mar_heads": mar_heads, "gpt_heads": gpt_heads}
    return model, source


def _official_command(source: dict) -> str:
    """The `d2c-export onnx` command line that exports from the official files of `source`."""
    files = source["official"]
    parts = [f"d2c-export onnx --checkpoint {files['stage2']['path']}"]
    parts += [f"--{role} {files[role]['path']}" for role in ("gpt", "vae") if role in files]
    parts += [] if source.get("ema", True) else ["--no-ema"]
    parts += [f"--{k.replace('_', '-')} {source[k]}" for k in ("mar_heads", "gpt_heads") if source.get(k) is not None]
    return " ".join(parts)


def _official_from_source(config: D2CConfig, source: dict) -> D2C:
    for role, record in source["official"].items():
        path = Path(record["path"])
        if not path.is_file():
            raise EngineError(f"{role} file {path} recorded in the manifest is missing; restore it or re-export with "
                              f"`{_official_command(source)}`")
        if checkpoint_sha256(path) != record["sha256"]:
            raise EngineError(f"{role} file {path} changed since export; re-export with `{_official_command(source)}`")
    files = {role: record["path"] for role, record in source["official"].items()}
    model = assemble(files["stage2"], files.get("gpt"), files.get("vae"), ema=source.get("ema", True),
                     mar_heads=source.get("mar_heads"), gpt_heads=source.get("gpt_heads"))
    if model.config.to_dict() != config.to_dict():
        raise EngineError(f"the files recorded in the manifest build {model.config.name!r}, not the exported "
                          f"{config.name!r}; re-export with `{_official_command(source)}`")
    return model


def model_from_source(config: D2CConfig, source: dict) -> D2C:
    """Rebuild the exact model a manifest was exported from (for the torch backend and `check`)."""
    if "official" in source:
        return _official_from_source(config, source)
    if "checkpoint" in source:
        path = Path(source["checkpoint"])
        if not path.is_file():
            raise EngineError(f"checkpoint {path} recorded in the manifest is missing; pass the engines of a "
                              "checkpoint that exists or re-export with `d2c-export onnx --checkpoint PATH`")
        if checkpoint_sha256(path) != source["sha256"]:
            raise EngineError(f"checkpoint {path} changed since export; re-export with "
                              f"`d2c-export onnx --checkpoint {path}`")
        return load_checkpoint(path)
    return random_model(config, int(source["random_init_seed"]))
