"""VQ image tokenizer (LlamaGen-style L2-normalised codebook) built on the KL-VAE's Encoder/Decoder."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.vae import NORM_GROUPS, make_codec


@dataclass
class VQArgs:
    """Hyper-parameters of VQModel; defaults follow LlamaGen's VQ-16 (codebook 16384 x 8, z_channels 256)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    resolution: int = 256  # nominal input size: only decides where level attention goes
    attn_resolutions: tuple[int, ...] = (16,)  # encoder level attention
    decoder_attn_resolutions: tuple[int, ...] = (16,)  # LlamaGen also attends at the decoder's lowest level
    z_channels: int = 256  # encoder output / decoder input width, around the 1x1 quant convs
    in_channels: int = 3
    out_ch: int = 3
    beta: float = 0.25  # commitment weight
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.decoder_attn_resolutions = tuple(int(r) for r in self.decoder_attn_resolutions)
        if self.codebook_size < 2 or self.codebook_embed_dim < 1 or self.z_channels < 1:
            raise ValueError("codebook_size >= 2, codebook_embed_dim >= 1 and z_channels >= 1 are required")
        if not self.ch_mult or min(self.ch_mult) <= 0:
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if self.ch <= 0 or any((self.ch * m) % NORM_GROUPS for m in self.ch_mult):
            raise ValueError(f"every ch * ch_mult must be divisible by {NORM_GROUPS} (GroupNorm groups)")
        if self.num_res_blocks < 1:
            raise ValueError("num_res_blocks must be >= 1")
        if self.resolution <= 0 or self.resolution % self.stride:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of stride {self.stride}")
        if self.beta < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("beta must be >= 0 and dropout in [0, 1)")

    @property
    def stride(self) -> int:
        """Spatial down-sampling factor between image and token grid."""
        return 2 ** (len(self.ch_mult) - 1)


VQ_PRESETS: dict[str, VQArgs] = {
    "vq-tiny": VQArgs(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(), decoder_attn_resolutions=(), z_channels=32),
    "vq16": VQArgs(),
}


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in an L2-normalised codebook with a straight-through estimator."""

    def __init__(self, codebook_size: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        with torch.no_grad():  # LlamaGen init: U(-1/n, 1/n), then row-normalised
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)  # (K, D)

    def lookup(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, h, w) -> (normalised z as (B, h, w, D), ids (B, h*w) int64, row-major)."""
        z = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)  # (B, h, w, D)
        flat = z.reshape(-1, z.shape[-1])  # (B*h*w, D)
        emb = self.codebook()  # (K, D)
        dist = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2.0 * flat @ emb.t()  # (B*h*w, K)
        ids = torch.argmin(dist, dim=1)  # (B*h*w,)
        return z, ids.view(z.shape[0], -1)

    def embed(self, ids: Tensor, grid: tuple[int, int]) -> Tensor:
        """ids (B, h*w) -> quantised latent (B, D, h, w)."""
        zq = F.embedding(ids, self.codebook())  # (B, h*w, D)
        return zq.view(ids.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """z (B, D, h, w) -> straight-through z_q (B, D, h, w), codebook + beta*commit loss, ids, loss parts."""
        zn, ids = self.lookup(z)  # (B, h, w, D), (B, h*w)
        zq = F.embedding(ids, self.codebook()).view(zn.shape)  # (B, h, w, D)
        codebook_loss = torch.mean((zq - zn.detach()) ** 2)
        commit_loss = self.beta * torch.mean((zq.detach() - zn) ** 2)
        zq = zn + (zq - zn).detach()  # straight-through: forward zq, gradient to zn
        parts = {"codebook": codebook_loss.detach(), "commit": commit_loss.detach()}
        return zq.permute(0, 3, 1, 2).contiguous(), codebook_loss + commit_loss, ids, parts


class VQModel(nn.Module):
    """Encoder -> 1x1 quant_conv -> VectorQuantizer -> 1x1 post_quant_conv -> Decoder."""

    def __init__(self, args: VQArgs) -> None:
        super().__init__()
        self.args = args
        a = args
        self.encoder, self.decoder = make_codec(a, a.z_channels, double_z=False)
        self.quant_conv = nn.Conv2d(a.z_channels, a.codebook_embed_dim, 1)
        self.quantize = VectorQuantizer(a.codebook_size, a.codebook_embed_dim, a.beta)
        self.post_quant_conv = nn.Conv2d(a.codebook_embed_dim, a.z_channels, 1)

    def encode_latent(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) -> pre-quantisation latent (B, D, H/s, W/s)."""
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, zq: Tensor) -> Tensor:
        """Quantised latent (B, D, h, w) -> image (B, 3, h*s, w*s), not clamped."""
        return self.decoder(self.post_quant_conv(zq))

    @torch.no_grad()
    def encode_to_ids(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) -> token ids (B, h*w) int64 in [0, codebook_size), row-major grid."""
        _, ids = self.quantize.lookup(self.encode_latent(x))
        return ids

    def decode_ids(self, ids: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Token ids (B, h*w) -> image (B, 3, h*s, w*s); `grid` defaults to a square (h, w)."""
        if grid is None:
            side = math.isqrt(ids.shape[1])
            if side * side != ids.shape[1]:
                raise ValueError(f"{ids.shape[1]} tokens is not a square grid; pass grid=(h, w)")
            grid = (side, side)
        return self.decode_latent(self.quantize.embed(ids.long(), grid))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Image -> (reconstruction (B, 3, H, W), quantisation loss (scalar), ids (B, h*w))."""
        zq, qloss, ids, _ = self.quantize(self.encode_latent(x))
        return self.decode_latent(zq), qloss, ids


def vq_loss(model: VQModel, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Pixel L1 + MSE (means, as in LlamaGen's pixel term; no LPIPS/GAN) + codebook + beta * commitment."""
    zq, qloss, _, qparts = model.quantize(model.encode_latent(images))
    recon = model.decode_latent(zq)  # (B, 3, H, W)
    diff = recon - images
    l1 = diff.abs().mean()
    mse = diff.pow(2).mean()
    total = l1 + mse + qloss
    parts = {"total": total.detach(), "l1": l1.detach(), "mse": mse.detach(), **qparts}
    return total, parts
