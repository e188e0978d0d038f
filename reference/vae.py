"""MAR's KL-16 AutoencoderKL (LDM-style encoder/decoder), re-implemented with the official state-dict keys."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LATENT_SCALE = 0.2325  # MAR multiplies sampled latents by this before modelling; divide before decoding
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # official posterior clamp
NORM_GROUPS, NORM_EPS = 32, 1e-6


@dataclass
class VAEArgs:
    """Hyper-parameters of AutoencoderKL; defaults are MAR's KL-16 (official Encoder/Decoder defaults)."""

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    resolution: int = 256  # nominal input size: only decides where level attention goes
    in_channels: int = 3
    out_ch: int = 3
    attn_resolutions: tuple[int, ...] = (16,)  # encoder level attention (official Encoder default)
    decoder_attn_resolutions: tuple[int, ...] = ()  # official Decoder default: no level attention
    dropout: float = 0.0
    use_variational: bool = True

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.decoder_attn_resolutions = tuple(int(r) for r in self.decoder_attn_resolutions)
        if self.embed_dim <= 0 or self.in_channels <= 0 or self.out_ch <= 0:
            raise ValueError("embed_dim, in_channels and out_ch must be positive")
        if not self.ch_mult or min(self.ch_mult) <= 0:
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if self.ch <= 0 or any((self.ch * m) % NORM_GROUPS for m in self.ch_mult):
            raise ValueError(f"every ch * ch_mult must be divisible by {NORM_GROUPS} (GroupNorm groups)")
        if self.num_res_blocks < 1:
            raise ValueError("num_res_blocks must be >= 1")
        if self.resolution <= 0 or self.resolution % self.stride:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of stride {self.stride}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    @property
    def stride(self) -> int:
        """Spatial down-sampling factor between image and latent."""
        return 2 ** (len(self.ch_mult) - 1)


VAE_PRESETS: dict[str, VAEArgs] = {
    "kl16": VAEArgs(),  # official MAR KL-16: 66,456,019 params
    "vae-tiny": VAEArgs(embed_dim=4, ch=32, ch_mult=(1, 2)),  # = fixture vae_tiny_a (2 res blocks)
}


def swish(x: Tensor) -> Tensor:
    """x * sigmoid(x), written out like the official `nonlinearity` (exports as Sigmoid + Mul)."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class Downsample(nn.Module):
    """Asymmetric zero pad (right/bottom by 1) then 3x3 stride-2 conv, as in LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class ResnetBlock(nn.Module):
    """GN-swish-conv x2 with a 1x1 `nin_shortcut` when channels change (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))  # (B, Cout, H, W)
        h = self.conv2(self.dropout(swish(self.norm2(h))))  # (B, Cout, H, W)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = float(channels) ** -0.5
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q = self.q(h).flatten(2)  # (B, C, N)
        k = self.k(h).flatten(2)  # (B, C, N)
        v = self.v(h).flatten(2)  # (B, C, N)
        w = torch.bmm(q.transpose(1, 2), k) * self.scale  # (B, Nq, Nk)
        w = torch.softmax(w, dim=2)
        out = torch.bmm(v, w.transpose(1, 2))  # (B, C, Nq)
        return x + self.proj_out(out.reshape(x.shape))  # (B, C, H, W)


class _Level(nn.Module):
    """One resolution level: `block` and `attn` lists (+ `downsample`/`upsample` set by the owner)."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: Tensor) -> Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn) > 0:  # structural, not data-dependent
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """LDM encoder: image (B, in_channels, H, W) -> (B, z_channels * (2 if double_z else 1), H/s, W/s)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, in_channels: int, z_channels: int, double_z: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            curr_res = resolution // 2**i
            block_in, block_out = ch * in_mult[i], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i, level in enumerate(self.down):
            h = level.run(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)  # halves H, W
        h = self.mid(h)  # (B, C_top, H/s, W/s)
        return self.conv_out(swish(self.norm_out(h)))  # (B, Z, H/s, W/s)


class Decoder(nn.Module):
    """LDM decoder: latent (B, z_channels, h, w) -> image (B, out_ch, h*s, w*s); `up[0]` is the full-res level."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, out_ch: int, z_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        n = len(ch_mult)
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, stride=1, padding=1)
        self.mid = _Mid(top, dropout)
        self.up = nn.ModuleList()
        for i, mult in enumerate(ch_mult):  # registered in index order, run from the top level down
            curr_res = resolution // 2**i
            block_in = ch * ch_mult[i + 1] if i + 1 < n else top
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
            self.up.append(level)
        self.norm_out = group_norm(ch * ch_mult[0])
        self.conv_out = nn.Conv2d(ch * ch_mult[0], out_ch, 3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_top, h, w)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            h = level.run(h)
            if i != 0:
                h = level.upsample(h)  # doubles H, W
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_ch, H, W)


@dataclass(eq=False)
class DiagonalGaussian:
    """Diagonal Gaussian posterior over latents; logvar is clamped to [-30, 20] like the official class."""

    mean: Tensor  # (B, C, h, w)
    logvar: Tensor  # (B, C, h, w), clamped
    std: Tensor = field(init=False)
    var: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.logvar = torch.clamp(self.logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split (B, 2C, h, w) quant_conv moments into mean (first C channels) and logvar."""
        mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, C, h, w) each
        return cls(mean, logvar)

    def sample(self, noise: Tensor) -> Tensor:
        """mean + std * noise; `noise` ~ N(0, I) of the mean's shape is supplied by the caller."""
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over C, H, W -> (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def make_codec(a, z_channels: int, double_z: bool) -> tuple[Encoder, Decoder]:
    """Encoder and Decoder of an autoencoder's args (VAEArgs or VQArgs share these fields)."""
    encoder = Encoder(ch=a.ch, ch_mult=a.ch_mult, num_res_blocks=a.num_res_blocks,
                      attn_resolutions=a.attn_resolutions, resolution=a.resolution,
                      in_channels=a.in_channels, z_channels=z_channels, double_z=double_z, dropout=a.dropout)
    decoder = Decoder(ch=a.ch, ch_mult=a.ch_mult, num_res_blocks=a.num_res_blocks,
                      attn_resolutions=a.decoder_attn_resolutions, resolution=a.resolution,
                      out_ch=a.out_ch, z_channels=z_channels, dropout=a.dropout)
    return encoder, decoder


class AutoencoderKL(nn.Module):
    """MAR's AutoencoderKL; `forward(z)` is the decode path exported as the `vae` stage."""

    def __init__(self, args: VAEArgs) -> None:
        super().__init__()
        self.args = args
        a = args
        self.encoder, self.decoder = make_codec(a, a.embed_dim, double_z=True)
        mult = 2 if a.use_variational else 1
        self.quant_conv = nn.Conv2d(2 * a.embed_dim, mult * a.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(a.embed_dim, a.embed_dim, 1)
        self.embed_dim = a.embed_dim

    def encode_moments(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> moments (B, 2*embed_dim, H/s, W/s): mean then logvar."""
        moments = self.quant_conv(self.encoder(x))  # (B, mult*E, h, w)
        if not self.args.use_variational:
            # official quirk: the non-variational model pads with logvar = 1 (std = e^0.5), not 0 variance
            moments = torch.cat([moments, torch.ones_like(moments)], dim=1)  # (B, 2E, h, w)
        return moments

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image -> posterior over (unscaled) latents."""
        return DiagonalGaussian.from_moments(self.encode_moments(x))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> image (B, 3, h*s, w*s), not clamped."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, z: Tensor) -> Tensor:
        return self.decode(z)
