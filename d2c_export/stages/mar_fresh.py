"""The `mar_fresh` stage: the chosen tokens through the decoder's layers after the cut (LazyMAR's token cache)."""
from __future__ import annotations

import torch
from torch import Tensor

from d2c_export.stages.cond import cond_width
from d2c_export.stages.mar_cached import cached_block_flops, dec_heads, positions
from d2c_export.stages.spec import Shapes, Sizes, StageSpec, TensorSpec, register
from reference.mar import Fusion
from reference.mar_cache import cached_layers
from reference.model import D2CConfig
from reference.stage_networks import STAGE_NETWORKS


def _inputs(c: D2CConfig) -> tuple[TensorSpec, ...]:
    m, s = c.mar, positions(c)
    specs = (TensorSpec("hidden", torch.float32, ("rows", s, m.decoder_embed_dim)),
             TensorSpec("pred", torch.int64, ("rows", "pred_len")),
             TensorSpec("others", torch.int64, ("rows", "others_len")))
    if m.fusion is Fusion.CROSS_ATTN:
        specs += (TensorSpec("fusion", torch.float32, ("rows", cond_width(c), m.encoder_embed_dim)),)
    if cached_layers(m.decoder_depth):
        h, hd = dec_heads(c)
        specs += (TensorSpec("dec_cache", torch.float32, ("rows", 2 * cached_layers(m.decoder_depth), h, s, hd)),)
    return specs


def _outputs(c: D2CConfig) -> tuple[TensorSpec, ...]:
    m = c.mar
    specs = (TensorSpec("z", torch.float32, ("rows", "pred_len", m.decoder_embed_dim)),)
    if cached_layers(m.decoder_depth):
        h, hd = dec_heads(c)
        specs += (TensorSpec("fresh_rows", torch.float32, ("rows", 2 * cached_layers(m.decoder_depth), h,
                                                           "fresh_len", hd)),)
    return specs


def _example(c: D2CConfig, sz: Sizes, gen: torch.Generator) -> dict[str, Tensor]:
    m, s, rows = c.mar, positions(c), sz["rows"]
    if sz["pred_len"] + sz["others_len"] > s or sz["pred_len"] > m.seq_len:
        raise ValueError(f"pred_len <= {m.seq_len} and pred_len + others_len <= {s}")
    pred = torch.stack([torch.randperm(m.seq_len, generator=gen)[:sz["pred_len"]] for _ in range(rows)])
    taken = torch.zeros(rows, s, dtype=torch.bool).scatter(1, pred + m.buffer_size, True)
    scores = torch.rand(rows, s, generator=gen).masked_fill(taken, 2.0)
    feeds = {"hidden": torch.randn(rows, s, m.decoder_embed_dim, generator=gen), "pred": pred.sort(-1).values,
             "others": scores.argsort(-1)[:, :sz["others_len"]].sort(-1).values}
    if m.fusion is Fusion.CROSS_ATTN:
        feeds["fusion"] = torch.randn(rows, cond_width(c), m.encoder_embed_dim, generator=gen)
    if cached_layers(m.decoder_depth):
        h, hd = dec_heads(c)
        feeds["dec_cache"] = torch.randn(rows, 2 * cached_layers(m.decoder_depth), h, s, hd, generator=gen)
    return feeds


def _flops(config: D2CConfig, shapes: Shapes) -> int:
    """The cut layer's MLP and every later layer over the P + F' chosen tokens, against all positions."""
    m, s = config.mar, positions(config)
    rows, pred = shapes["pred"]
    n = pred + shapes["others"][1]
    dd = m.decoder_embed_dim
    hidden = int(dd * m.mlp_ratio)
    ctx = m.discrete_len if m.fusion is Fusion.CROSS_ATTN else 0
    return 4 * rows * n * dd * hidden + cached_layers(m.decoder_depth) * cached_block_flops(
        rows, n, s, dd, hidden, ctx, m.encoder_embed_dim)


MAR_FRESH = register(StageSpec(
    name="mar_fresh",
    label="fresh mar tokens",
    runs="once per masked step with the token cache: the tokens to predict and the most changed ones through the "
         "decoder's layers after the cut -> conditions z",
    inputs=_inputs,
    outputs=_outputs,
    wrapper=STAGE_NETWORKS["mar_fresh"],
    axes=lambda c, b: {"rows": (1, 2, 2 * b), "pred_len": (1, max(2, c.mar.seq_len // 8), c.mar.seq_len),
                       "others_len": (0, positions(c) // 4, positions(c) - 1)},
    example=_example,
    flops=_flops,
    varargs_from=3,
    optional=True,  # only lazy MAR steps with the token cache run it
))
