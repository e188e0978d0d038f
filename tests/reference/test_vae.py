"""Tests for reference/vae.py (KL-VAE parity with official MAR fixtures) and the VQ preset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reference.vae import LATENT_SCALE, VAE_PRESETS, AutoencoderKL, DiagonalGaussian, VAEArgs

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_dir(official_dir: Path) -> Path:
    return official_dir / "vae_tiny_a"


@pytest.fixture(scope="module")
def io(tiny_dir: Path) -> dict[str, torch.Tensor]:
    with np.load(tiny_dir / "io.npz") as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.fixture(scope="module")
def tiny_vae(tiny_dir: Path) -> AutoencoderKL:
    meta = json.loads((tiny_dir / "meta.json").read_text())
    args = meta["constructor_args"]
    cfg = VAEArgs(embed_dim=args["embed_dim"], ch=32, ch_mult=tuple(args["ch_mult"]),
                  use_variational=args["use_variational"])
    assert cfg == VAE_PRESETS["vae-tiny"]
    model = AutoencoderKL(cfg).eval()
    model.load_state_dict(load_file(str(tiny_dir / "model.safetensors")), strict=True)
    assert sum(p.numel() for p in model.parameters()) == meta["derived"]["num_params"]
    return model


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_kl16_keys_match_official_manifest(official_dir: Path) -> None:
    manifest = json.loads((official_dir / "keys" / "mar_vae_kl16.json").read_text())
    with torch.device("meta"):
        model = AutoencoderKL(VAE_PRESETS["kl16"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["keys"]
    assert list(shapes) == list(manifest["keys"])  # same order as the official state_dict
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"] == 66_456_019
    assert VAE_PRESETS["kl16"].stride == 16 and LATENT_SCALE == 0.2325


def test_vae_args_validation() -> None:
    assert VAEArgs(ch_mult=[1, 2]).ch_mult == (1, 2)
    with pytest.raises(ValueError):
        VAEArgs(ch=24)  # not divisible by 32 GroupNorm groups
    with pytest.raises(ValueError):
        VAEArgs(ch_mult=())
    with pytest.raises(ValueError):
        VAEArgs(resolution=100)


@torch.no_grad()
def test_tiny_decode_matches_official(tiny_vae: AutoencoderKL, io: dict[str, torch.Tensor]) -> None:
    assert _maxdiff(tiny_vae.decode(io["in_z"]), io["out_decode"]) <= TOL
    assert _maxdiff(tiny_vae(io["in_z"]), io["out_decode"]) <= TOL


@torch.no_grad()
def test_tiny_encode_matches_official(tiny_vae: AutoencoderKL, io: dict[str, torch.Tensor]) -> None:
    moments = tiny_vae.encode_moments(io["in_x"])
    assert _maxdiff(moments, io["out_encode_moments"]) <= TOL
    post = DiagonalGaussian.from_moments(moments)
    for name in ("mean", "logvar", "std", "var"):
        assert _maxdiff(getattr(post, name), io[f"out_encode_{name}"]) <= TOL, name
    sample = post.sample(io["out_encode_sample_noise"])
    assert _maxdiff(sample, io["out_encode_sample"]) <= TOL
    kl = post.kl()
    assert kl.shape == (2,) and torch.isfinite(kl).all()


def test_posterior_clamps_logvar() -> None:
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], dim=1)
    post = DiagonalGaussian.from_moments(moments)
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.allclose(post.std, torch.exp(0.5 * post.logvar))


@torch.no_grad()
def test_decode_batch_sizes(tiny_vae: AutoencoderKL, io: dict[str, torch.Tensor]) -> None:
    z = io["in_z"]
    ref = tiny_vae.decode(z)
    for bsz in (1, 3, 5):
        zb = z[torch.arange(bsz) % 2]  # (bsz, 4, 8, 8)
        out = tiny_vae.decode(zb)
        assert out.shape == (bsz, 3, 16, 16)
        assert _maxdiff(out, ref[torch.arange(bsz) % 2]) <= TOL
    out = tiny_vae.decode(torch.randn(2, 4, 4, 6))  # non-square latent grid
    assert out.shape == (2, 3, 8, 12)


def test_decode_exports_with_dynamic_batch(tiny_vae: AutoencoderKL, io: dict[str, torch.Tensor]) -> None:
    from torch.export import Dim, export

    ep = export(tiny_vae, (io["in_z"],), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    with torch.no_grad():
        out = ep.module()(torch.cat([io["in_z"]] * 3))  # batch 6, not the traced 2
    assert _maxdiff(out[4:], io["out_decode"]) <= TOL
