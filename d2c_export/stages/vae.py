"""The `vae` stage: the KL VAE decoder, latents -> pixels in [-1, 1]."""
from __future__ import annotations

import torch

from d2c_export.stages.flop_math import conv, resnet_block, spatial_attention
from d2c_export.stages.spec import Shapes, StageSpec, TensorSpec, register
from reference.model import D2CConfig


def _latent_hw(c: D2CConfig) -> int:
    return c.image_size // c.vae.stride


def vae_flops(config: D2CConfig, batch: int, height: int, width: int) -> int:
    """post_quant_conv, then the LDM decoder (conv_in, mid, levels from the top down with up-sampling, conv_out)."""
    v = config.vae
    n, top = len(v.ch_mult), v.ch * v.ch_mult[-1]
    pixels = height * width
    flops = conv(batch, pixels, v.embed_dim, v.embed_dim, 1) + conv(batch, pixels, v.embed_dim, top, 3)
    flops += 2 * resnet_block(batch, pixels, top, top) + spatial_attention(batch, pixels, top)
    for i in reversed(range(n)):
        block_in = v.ch * v.ch_mult[i + 1] if i + 1 < n else top
        block_out = v.ch * v.ch_mult[i]
        attn = v.resolution // 2 ** i in v.decoder_attn_resolutions
        for _ in range(v.num_res_blocks + 1):
            flops += resnet_block(batch, pixels, block_in, block_out) + (
                spatial_attention(batch, pixels, block_out) if attn else 0)
            block_in = block_out
        if i != 0:
            pixels *= 4
            flops += conv(batch, pixels, block_in, block_in, 3)
    return flops + conv(batch, pixels, v.ch * v.ch_mult[0], v.out_ch, 3)


def _flops(config: D2CConfig, shapes: Shapes) -> int:
    batch, _, height, width = shapes["latents"]
    return vae_flops(config, batch, height, width)


VAE = register(StageSpec(
    name="vae",
    label="vae",
    runs="once per image: latents -> pixels in [-1, 1]",
    inputs=lambda c: (TensorSpec("latents", torch.float32, ("batch", c.vae.embed_dim, _latent_hw(c), _latent_hw(c))),),
    outputs=lambda c: (TensorSpec("images", torch.float32, ("batch", 3, c.image_size, c.image_size)),),
    wrapper=lambda m: m.vae,
    axes=lambda c, b: {"batch": (1, 2, b)},
    example=lambda c, s, gen: {"latents": torch.randn(s["batch"], c.vae.embed_dim, _latent_hw(c), _latent_hw(c),
                                                      generator=gen)},
    flops=_flops,
))
