"""The recorded official weights wrapped in the official checkpoint layouts, and full-size manifests as states."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from tests.conftest import OFFICIAL
from tests.reference.official import weights

MAR_HEADS, GPT_HEADS = 4, 4  # the tiny official models' heads (meta.json); not an official size, so given
# The tiny MAR's 16 token channels read with the 4-channel tiny VAE: patch 2 (it was recorded at patch 1 on a
# 16-channel latent, which no tiny VAE has; the MAR network is the same either way, only (un)patchify differ).
MAR_PATCH = 2
MANIFESTS = ("mar_base", "mar_large", "mar_huge", "mar_vae_kl16", "llamagen_gpt_b", "llamagen_gpt_l")


def manifest(name: str) -> dict:
    return json.loads((OFFICIAL / "keys" / f"{name}.json").read_text())


def manifest_state(name: str) -> dict[str, Tensor]:
    """A state dict of the recorded keys and shapes on the meta device (float32, no memory)."""
    return {k: torch.empty(shape, device="meta") for k, shape in manifest(name)["keys"].items()}


def shifted(state: dict[str, Tensor], by: float = 1.0) -> dict[str, Tensor]:
    """Other weights of the same layout (the non-EMA entry of a file whose EMA entry is the recorded one)."""
    return {k: v + by for k, v in state.items()}


def write_official_files(folder: Path) -> dict[str, Path]:
    """mar.pth (MAR: "model" shifted, "model_ema" recorded, plus training entries), kl16-like vae.ckpt
    ({"model": ...} with a training-loss key), gpt.pt ({"model": ...}) in `folder`."""
    mar, vae, gpt = (weights(OFFICIAL / name) for name in ("mar_tiny_a", "vae_tiny_a", "gpt_tiny_a"))
    files = {"mar": folder / "mar.pth", "vae": folder / "vae.ckpt", "gpt": folder / "gpt.pt"}
    torch.save({"model": shifted(mar), "model_ema": mar, "epoch": 399, "optimizer": {"state": {}, "param_groups": []}},
               files["mar"])
    torch.save({"model": {**vae, "loss.logvar": torch.zeros(())}}, files["vae"])
    torch.save({"model": gpt, "steps": 1000}, files["gpt"])
    return files
