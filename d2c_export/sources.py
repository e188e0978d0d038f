"""Where a model comes from: a native checkpoint, or a preset with seeded random weights."""
from __future__ import annotations

from pathlib import Path

import torch

from d2c_export.manifest import EngineError
from reference.checkpoint import checkpoint_sha256, load_checkpoint
from reference.model import D2C, D2CConfig, get_config


def model_from_args(config: str | None, checkpoint: str | Path | None, seed: int = 0) -> tuple[D2C, dict]:
    """The model for `d2c-export`: a checkpoint when given, else preset `config` with seeded random weights.

    Returns the model (eval mode) and its source record for the manifest.
    """
    if checkpoint is not None:
        path = Path(checkpoint).resolve()
        model = load_checkpoint(path)
        return model, {"checkpoint": str(path), "sha256": checkpoint_sha256(path)}
    torch.manual_seed(seed)
    return D2C(get_config(config or "d2c-tiny")).eval(), {"random_init_seed": seed}


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
    torch.manual_seed(int(source["random_init_seed"]))
    model = D2C(config).eval()
    return model
