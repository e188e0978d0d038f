"""The `cond` stage: the fusion network, discrete ids -> Q-Former queries or cross-attention context."""
from __future__ import annotations

import torch

from d2c_export.stages.flop_math import vit_block
from d2c_export.stages.spec import Shapes, StageSpec, TensorSpec, register
from reference.mar import Fusion
from reference.model import D2CConfig


def cond_width(c: D2CConfig) -> int:
    """Tokens of fusion features: the buffer slots under Q-Former fusion, every discrete token under cross-attention."""
    return c.mar.buffer_size if c.mar.fusion is Fusion.QFORMER else c.mar.discrete_len


def _flops(config: D2CConfig, shapes: Shapes) -> int:
    """Q-Former: `buffer_size` queries through blocks that cross-attend to the discrete tokens; else none counted
    (embedding + LayerNorm only)."""
    m = config.mar
    if m.fusion is not Fusion.QFORMER:
        return 0
    rows, d = shapes["discrete_ids"][0], m.encoder_embed_dim
    return m.qformer_depth * vit_block(rows, m.buffer_size, d, int(d * m.mlp_ratio), context=m.discrete_len,
                                       context_dim=d)


COND = register(StageSpec(
    name="cond",
    label="cond",
    runs="once per image: discrete ids (null ids for the unconditional rows) -> fusion features",
    inputs=lambda c: (TensorSpec("discrete_ids", torch.int64, ("rows", c.mar.discrete_len)),),
    outputs=lambda c: (TensorSpec("fusion", torch.float32, ("rows", cond_width(c), c.mar.encoder_embed_dim)),),
    wrapper=lambda m: m.mar.condition,
    axes=lambda c, b: {"rows": (1, 2, 2 * b)},
    example=lambda c, s, gen: {"discrete_ids": torch.randint(0, c.mar.codebook_size + 1,
                                                             (s["rows"], c.mar.discrete_len), generator=gen)},
    flops=_flops,
    applies=lambda c: c.mar.fusion is not Fusion.NONE,
))
