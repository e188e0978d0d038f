"""The demo's autoencoder losses train: the KL VAE (training.losses) and the VQ tokenizer (training.vq)."""
from __future__ import annotations

import torch

from reference.vae import VAE_PRESETS, AutoencoderKL
from training.losses import kl_vae_loss
from training.vq import VQ_PRESETS, VQModel, vq_loss

TOL = 1e-5


def _train_steps(loss_fn, model: torch.nn.Module, steps: int = 6) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_kl_vae_loss_trains() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(VAE_PRESETS["vae-tiny"]).train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, 4, 8, 8)
    loss, parts = kl_vae_loss(model, images, noise)
    assert torch.isfinite(loss) and set(parts) >= {"total", "l1", "mse", "kl"}
    assert all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    grad = model.decoder.conv_out.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    model.zero_grad()
    losses = _train_steps(lambda: kl_vae_loss(model, images, noise), model)
    assert losses[-1] < losses[0]


def test_vq_tokenizer_ids_and_training() -> None:
    torch.manual_seed(0)
    args = VQ_PRESETS["vq-tiny"]
    model = VQModel(args)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = model.eval().encode_to_ids(images)
    grid = 16 // args.stride
    assert ids.dtype == torch.int64 and ids.shape == (3, grid * grid)
    assert int(ids.min()) >= 0 and int(ids.max()) < args.codebook_size
    recon = model.decode_ids(ids)
    assert recon.shape == (3, 3, 16, 16)
    recon2, qloss, ids2 = model(images)
    assert torch.equal(ids2, ids) and recon2.shape == recon.shape and qloss.ndim == 0
    assert torch.allclose(recon2, recon, atol=TOL)  # straight-through forward equals the id round trip
    assert model.decode_ids(ids[:, :8], grid=(2, 4)).shape == (3, 3, 4, 8)

    model.train()
    loss, parts = vq_loss(model, images)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert model.quantize.embedding.weight.grad.abs().sum() > 0  # codebook loss reaches the codebook
    model.zero_grad()
    losses = _train_steps(lambda: vq_loss(model, images), model)
    assert losses[-1] < losses[0]


def test_vq16_preset_builds_on_meta() -> None:
    with torch.device("meta"):
        model = VQModel(VQ_PRESETS["vq16"])
    assert VQ_PRESETS["vq16"].stride == 16
    assert model.quantize.embedding.weight.shape == (16384, 8)
