"""The per-token diffusion head: MAR's SimpleMLPAdaLN (timestep embedder, AdaLN residual MLP blocks)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FREQ_EMBED_DIM = 256
MAX_PERIOD = 10000


@dataclass
class HeadArgs:
    in_channels: int = 16  # token channels C; the head outputs 2C (eps, then variance values)
    z_channels: int = 768  # width of the conditions from the MAR decoder
    width: int = 1024
    depth: int = 6

    def __post_init__(self) -> None:
        if min(self.in_channels, self.z_channels, self.width, self.depth) < 1:
            raise ValueError(f"HeadArgs fields must be positive: {self}")


def timestep_embedding(t: Tensor, dim: int = FREQ_EMBED_DIM, max_period: int = MAX_PERIOD) -> Tensor:
    """(N,) timesteps -> (N, dim) sinusoidal embedding [cos, sin], float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """x (N, C), t (N,) original-scale timesteps, c (N, Dz) -> (N, 2C): eps then variance values."""

    def __init__(self, args: HeadArgs):
        super().__init__()
        self.args = args
        self.in_channels = args.in_channels
        self.time_embed = TimestepEmbedder(args.width)
        self.cond_embed = nn.Linear(args.z_channels, args.width)
        self.input_proj = nn.Linear(args.in_channels, args.width)
        self.res_blocks = nn.ModuleList(ResBlock(args.width) for _ in range(args.depth))
        self.final_layer = FinalLayer(args.width, 2 * args.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        h = self.input_proj(x)  # (N, W)
        y = self.time_embed(t) + self.cond_embed(c)  # (N, W)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)  # (N, 2C)


class DiffLoss(nn.Module):
    """Holds the head under MAR's key prefix (`diffloss.net.*`); training and sampling live elsewhere."""

    def __init__(self, args: HeadArgs):
        super().__init__()
        self.net = SimpleMLPAdaLN(args)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.net(x, t, c)
