"""What the TensorRT contract tests share: plans built on the fakes, a backend over them, a d2c-b-shaped model,
and a masked step's denoising feeds."""
from __future__ import annotations

import torch

from d2c_export.backends.trt import TrtBackend
from d2c_export.engines import Engines
from d2c_export.export.trt_build import build_engines
from d2c_export.backends import Precision
from reference.model import get_config


def plans(directory, fake, precision: Precision = Precision.FP32) -> Engines:
    """The FP32 (or FP16) plans of the engines in `directory`, built by the real builder code on the fake."""
    device, trt = fake
    build_engines(Engines.open(directory), fp16=precision is Precision.FP16, progress=False, trt=trt, device=device)
    return Engines.open(directory)


def backend(engines: Engines, fake, precision: Precision = Precision.FP32) -> TrtBackend:
    device, trt = fake
    return TrtBackend(engines, precision, trt=trt, device=device)


def replays(fake) -> int:
    """Graph replays as the fake device counted them."""
    return fake[0].replays


def assert_same(got: tuple, want: tuple, what) -> None:
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=lambda m: f"{what}: {m}")


def d2c_b_shaped(vae_levels: int = 5):
    """d2c-b's structure (256 discrete tokens, 16x16 latent grid of 16 channels, Q-Former, 256 px) at tiny widths,
    with a vocabulary of 1024 ids: the loop draws a uniform per id for every discrete token (float64), which at
    d2c-b's 16384 ids took most of a generation on the CPU and is no part of what these tests check.

    `vae_levels` below kl16's 5: the same tokens decoded by a VAE of that many levels (stride 2 ** (levels - 1)),
    so images of 16 x stride px (the 256 px decoder's 32-channel convolutions at full size are most of the CPU time
    of a generation at batch 16, and no part of what the backend does with the other stages)."""
    from reference.gpt import GPTArgs
    from reference.model import D2CConfig, PRESETS
    from reference.vae import VAEArgs
    b = get_config("d2c-b")
    stride = 2 ** (vae_levels - 1)
    vae = VAEArgs(embed_dim=16, ch=32, ch_mult=(1, 1, 2, 2, 4)[:vae_levels], num_res_blocks=1,
                  resolution=16 * stride, attn_resolutions=())
    mar = b.mar.__class__(**{**vars(b.mar), "encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2,
                              "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "diffloss_d": 1,
                              "diffloss_w": 32, "qformer_depth": 1, "qformer_num_heads": 2, "class_num": 10,
                              "codebook_size": 1024, "img_size": 16 * stride, "vae_stride": stride})
    gpt = GPTArgs(dim=32, n_layer=2, n_head=2, vocab_size=1024, block_size=256, num_classes=10)
    name = "d2c-b-shaped" if vae_levels == 5 else f"d2c-b-shaped-{16 * stride}px"
    config = D2CConfig(name, mar, vae, gpt)
    return config, PRESETS


def loop_feeds(config, rows: int, steps: int, seed: int, groups: int = 2) -> dict:
    """The feeds of `Stages.denoise` for one masked step of `rows` latent rows, on the fake's device."""
    from reference.diffusion import make_tables, step_tables
    g = torch.Generator().manual_seed(seed)
    m = config.mar
    return {"noise": torch.randn(steps + 1, rows, m.token_dim, generator=g),
            "z": torch.randn(groups * rows, m.decoder_embed_dim, generator=g), **step_tables(make_tables(steps)),
            "cfg": torch.tensor([1.5 + seed % 3]), "temperature": torch.tensor([0.9])}


def on_device(device, feeds: dict) -> dict:
    out = {}
    for n, t in feeds.items():
        out[n] = device.empty(tuple(t.shape), t.dtype)
        out[n].copy_(t)
    return out
