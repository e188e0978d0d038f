"""Loading the recorded official fixtures: arrays, weights and draw logs as tensors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from safetensors.torch import load_file

from reference.mar import Fusion, MARArgs

_KIND = {"torch.randn": "normal", "torch.randn_like": "normal", "np.random.shuffle(result)": "permutation"}


def arrays(path: Path) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in np.load(path).items()}


def weights(fixture: Path) -> dict[str, torch.Tensor]:
    return load_file(fixture / "model.safetensors")


def draw_records(fixture: Path, call: str) -> list[tuple[str, torch.Tensor]]:
    """The recorded draws of one call, in order, as (kind, value) for `ReplayDraws`."""
    meta = json.loads((fixture / "meta.json").read_text())
    draws = np.load(fixture / "draws.npz")
    out = []
    for rec in meta["draws"]["records"][call]:
        value = torch.from_numpy(np.asarray(draws[f"{call}_draw_{rec['index']:03d}"]))
        out.append((_KIND[rec["kind"]], value))
    return out


def mar_tiny_args(fixture: Path) -> MARArgs:
    """MARArgs of the recorded tiny official MAR (plain MAR, no fusion)."""
    c = json.loads((fixture / "meta.json").read_text())["constructor_args"]
    return MARArgs(img_size=c["img_size"], vae_stride=c["vae_stride"], patch_size=c["patch_size"],
                   vae_embed_dim=c["vae_embed_dim"], encoder_embed_dim=c["encoder_embed_dim"],
                   encoder_depth=c["encoder_depth"], encoder_num_heads=c["encoder_num_heads"],
                   decoder_embed_dim=c["decoder_embed_dim"], decoder_depth=c["decoder_depth"],
                   decoder_num_heads=c["decoder_num_heads"], mlp_ratio=c["mlp_ratio"],
                   buffer_size=c["buffer_size"], class_num=c["class_num"], diffloss_d=c["diffloss_d"],
                   diffloss_w=c["diffloss_w"], fusion=Fusion.NONE)


def mask_to_kept(mask: Tensor) -> Tensor:
    """(B, L) 0/1 mask (1 = masked, the same count per row) -> (B, K) sorted kept positions."""
    keep = mask < 0.5
    counts = keep.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every row must keep the same number of tokens")
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    order = torch.where(keep, pos, pos + mask.shape[1]).sort(-1).values
    return order[:, : int(counts[0])]
