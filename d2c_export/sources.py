"""Where a model comes from: a native checkpoint, or a preset with seeded random weights."""
from __future__ import annotations

from pathlib import Path

import torch

from d2c_export.manifest import EngineError
from reference.checkpoint import checkpoint_sha256, load_checkpoint
from reference.model import D2C, D2CConfig, get_config

RANDOM_WEIGHT_NOISE = 0.02  # std of the noise added to every parameter of a random-weight model


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


def model_from_args(config: str | None, checkpoint: str | Path | None, seed: int = 0) -> tuple[D2C, dict]:
    """The model for `d2c-export`: a checkpoint when given, else preset `config` with seeded random weights.

    Returns the model (eval mode) and its source record for the manifest.
    """
    if checkpoint is not None:
        path = Path(checkpoint).resolve()
        model = load_checkpoint(path)
        return model, {"checkpoint": str(path), "sha256": checkpoint_sha256(path)}
    return random_model(get_config(config or "d2c-tiny"), seed), {"random_init_seed": seed}


def model_from_source(config: D2CConfig, source: dict) -> D2C:
    """Rebuild the exact model a manifest was exported from (for the torch backend and `check`)."""
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
