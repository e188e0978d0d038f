"""The `diffusion` stage: one guided denoising step of MAR's head, then the DDPM posterior update."""
from __future__ import annotations

import torch
from torch import Tensor

from d2c_export.row_buckets import row_bucket
from d2c_export.stages.flop_math import linear
from d2c_export.stages.spec import Sizes, StageSpec, TensorSpec, default_parity_sizes, register
from reference.diffusion import NUM_COEFS, make_tables
from reference.diffusion_head import FREQ_EMBED_DIM
from reference.model import D2CConfig
from reference.pipeline import SamplingParams
from reference.sampling import step_positions
from reference.stage_networks import STAGE_NETWORKS

EXAMPLE_SAMPLING = SamplingParams()  # the example step is one of the default respacing, at the default guidance


def _example(c: D2CConfig, s: Sizes, gen: torch.Generator) -> dict[str, Tensor]:
    m, n = c.mar, s["n"]
    tables = make_tables(EXAMPLE_SAMPLING.diffusion_steps)
    index = int(torch.randint(0, tables.num_timesteps, (1,), generator=gen))
    groups = max(1, s["m"] // n)
    return {"x": torch.randn(n, m.token_dim, generator=gen) * 3.0,
            "t": torch.tensor([tables.model_timestep(index)]),
            "z": torch.randn(groups * n, m.decoder_embed_dim, generator=gen),
            "noise": torch.randn(n, m.token_dim, generator=gen),
            "cfg": torch.tensor([EXAMPLE_SAMPLING.cfg]), "temperature": torch.tensor([EXAMPLE_SAMPLING.temperature]),
            "coefs": tables.coefficients(index)}


def diffusion_flops(config: D2CConfig, head_rows: int) -> int:
    """SimpleMLPAdaLN on G*N rows: input, time and condition embeddings, res blocks (MLP + AdaLN), final layer."""
    h = config.mar.head
    w = h.width
    flops = linear(head_rows, h.in_channels, w) + linear(head_rows, FREQ_EMBED_DIM, w) + linear(head_rows, w, w) \
        + linear(head_rows, h.z_channels, w)
    flops += h.depth * (2 * linear(head_rows, w, w) + linear(head_rows, w, 3 * w))
    return flops + linear(head_rows, w, 2 * w) + linear(head_rows, w, 2 * h.in_channels)


def _tuned(config: D2CConfig, max_batch: int) -> Sizes:
    """The rows of a full batch's median masked step under the model's recommended sampling, at their row bucket
    (the size a captured loop runs, `d2c_export.row_buckets`): d2c-b at max batch 16 denoises 64 to 112 rows a step."""
    params = SamplingParams(**SamplingParams.recommended_for(config))
    seq_len = config.mar.seq_len
    preds = sorted(pred.shape[1] for _, pred in step_positions(torch.arange(seq_len)[None], seq_len, params.num_iter))
    n = row_bucket(max_batch * preds[len(preds) // 2])
    return {"n": n, "m": (2 if params.cfg != 1.0 else 1) * n}


def _parity_sizes(profile: dict[str, tuple[int, int, int]]) -> list[Sizes]:
    """The default three, the odd one unguided (m = n): the opt example is guided."""
    opt, smallest, odd = default_parity_sizes(profile)
    return [opt, smallest, {**odd, "m": odd["n"]}]


DIFFUSION = register(StageSpec(
    name="diffusion",
    label="diffusion step",
    runs="once per denoising step: head with guidance, then the DDPM posterior update",
    inputs=lambda c: (TensorSpec("x", torch.float32, ("n", c.mar.token_dim)),
                      TensorSpec("t", torch.int64, (1,)),
                      TensorSpec("z", torch.float32, ("m", c.mar.decoder_embed_dim)),
                      TensorSpec("noise", torch.float32, ("n", c.mar.token_dim)),
                      TensorSpec("cfg", torch.float32, (1,)),
                      TensorSpec("temperature", torch.float32, (1,)),
                      TensorSpec("coefs", torch.float32, (NUM_COEFS,))),
    outputs=lambda c: (TensorSpec("x_prev", torch.float32, ("n", c.mar.token_dim)),),
    wrapper=STAGE_NETWORKS["diffusion"],
    axes=lambda c, b: {"n": (1, 16, b * c.mar.seq_len), "m": (1, 32, 2 * b * c.mar.seq_len)},
    example=_example,
    flops=lambda c, shapes: diffusion_flops(c, shapes["z"][0]),
    tuned=_tuned,
    # guided_output and ddpm_step, after the head's last linear layer: sqrt(1/alpha_bar) reaches about 2e4
    fp32_tails=("x_prev",),
    cuda_graph=True,  # the same shapes for every denoising step of a masked step
    parity_sizes=_parity_sizes,
))
