"""The `mar_cached` stage: a cached mar step up to the decoder's cut layer (LazyMAR's token cache, first half)."""
from __future__ import annotations

import torch
from torch import Tensor

from d2c_export.stages.cond import cond_width
from d2c_export.stages.flop_math import linear, vit_block
from d2c_export.stages.spec import Shapes, Sizes, StageSpec, TensorSpec, register
from reference.mar import Fusion
from reference.mar_cache import cut_layer
from reference.model import D2CConfig
from reference.stage_networks import STAGE_NETWORKS


def positions(c: D2CConfig) -> int:
    """Sequence positions of the caches: the buffer slots, then the tokens."""
    return c.mar.buffer_size + c.mar.seq_len


def enc_heads(c: D2CConfig) -> tuple[int, int]:
    return c.mar.encoder_num_heads, c.mar.encoder_embed_dim // c.mar.encoder_num_heads


def dec_heads(c: D2CConfig) -> tuple[int, int]:
    return c.mar.decoder_num_heads, c.mar.decoder_embed_dim // c.mar.decoder_num_heads


def _inputs(c: D2CConfig) -> tuple[TensorSpec, ...]:
    m, s = c.mar, positions(c)
    specs = (TensorSpec("tokens", torch.float32, ("rows", m.seq_len, m.token_dim)),
             TensorSpec("kept", torch.int64, ("rows", "kept_len")),
             TensorSpec("recent", torch.int64, ("rows", "recent_len")),
             TensorSpec("labels", torch.int64, ("rows",)))
    if m.fusion is not Fusion.NONE:
        specs += (TensorSpec("fusion", torch.float32, ("rows", cond_width(c), m.encoder_embed_dim)),)
    return specs + (TensorSpec("enc_cache", torch.float32, ("rows", 2 * m.encoder_depth, *enc_heads(c)[:1], s,
                                                             enc_heads(c)[1])),
                    TensorSpec("dec_in_cache", torch.float32, ("rows", s, m.decoder_embed_dim)),
                    TensorSpec("cut_cache", torch.float32, ("rows", dec_heads(c)[0], s, dec_heads(c)[1])))


def _outputs(c: D2CConfig) -> tuple[TensorSpec, ...]:
    m, s = c.mar, positions(c)
    return (TensorSpec("hidden", torch.float32, ("rows", s, m.decoder_embed_dim)),
            TensorSpec("scores", torch.float32, ("rows", s)),
            TensorSpec("enc_rows", torch.float32, ("rows", 2 * m.encoder_depth, enc_heads(c)[0], "enc_len",
                                                   enc_heads(c)[1])),
            TensorSpec("dec_rows", torch.float32, ("rows", "enc_len", m.decoder_embed_dim)),
            TensorSpec("cut_values", torch.float32, ("rows", dec_heads(c)[0], s, dec_heads(c)[1])))


def _example(c: D2CConfig, sz: Sizes, gen: torch.Generator) -> dict[str, Tensor]:
    m, s, rows = c.mar, positions(c), sz["rows"]
    if sz["recent_len"] > sz["kept_len"]:
        raise ValueError("recent_len must be <= kept_len (the recent tokens are kept ones)")
    order = torch.stack([torch.randperm(m.seq_len, generator=gen) for _ in range(rows)])
    kept = order[:, :sz["kept_len"]]
    feeds = {"tokens": torch.randn(rows, m.seq_len, m.token_dim, generator=gen), "kept": kept.sort(-1).values,
             "recent": kept[:, :sz["recent_len"]].sort(-1).values,
             "labels": torch.randint(0, m.class_num + 1, (rows,), generator=gen)}
    if m.fusion is not Fusion.NONE:
        feeds["fusion"] = torch.randn(rows, cond_width(c), m.encoder_embed_dim, generator=gen)
    feeds["enc_cache"] = torch.randn(rows, 2 * m.encoder_depth, enc_heads(c)[0], s, enc_heads(c)[1], generator=gen)
    feeds["dec_in_cache"] = torch.randn(rows, s, m.decoder_embed_dim, generator=gen)
    feeds["cut_cache"] = torch.randn(rows, dec_heads(c)[0], s, dec_heads(c)[1], generator=gen)
    return feeds


def cached_block_flops(rows: int, n: int, positions_: int, dim: int, hidden: int, context: int, context_dim: int,
                       mlp: bool = True) -> int:
    """A block of n query tokens attending to every position's keys and values (the cache's): qkv and projection
    on the n tokens, q k^T and a v over all positions, cross-attention over `context` tokens, the MLP."""
    flops = 8 * rows * n * dim * dim + 4 * rows * n * positions_ * dim + (4 * rows * n * dim * hidden if mlp else 0)
    if context:
        flops += 4 * rows * n * dim * dim + 4 * rows * context * context_dim * dim + 4 * rows * n * context * dim
    return flops


def _flops(config: D2CConfig, shapes: Shapes) -> int:
    """z_proj over the L tokens; the encoder over the buffer and the recent tokens against all positions;
    decoder_embed of those; decoder layers before the cut over all positions; the cut layer's attention."""
    m, s = config.mar, positions(config)
    rows, recent = shapes["recent"]
    n = m.buffer_size + recent
    de, dd = m.encoder_embed_dim, m.decoder_embed_dim
    ctx = m.discrete_len if m.fusion is Fusion.CROSS_ATTN else 0
    flops = linear(rows * m.seq_len, m.token_dim, de) + linear(rows * n, de, dd)
    flops += m.encoder_depth * cached_block_flops(rows, n, s, de, int(de * m.mlp_ratio), ctx, de)
    flops += cut_layer(m.decoder_depth) * vit_block(rows, s, dd, int(dd * m.mlp_ratio), ctx, de)
    return flops + cached_block_flops(rows, s, s, dd, 0, ctx, de, mlp=False)


def cache_axes(c: D2CConfig, b: int) -> dict[str, tuple[int, int, int]]:
    """rows: both halves of a guided full step; kept and recent tokens: none at the first step."""
    L = c.mar.seq_len
    return {"rows": (1, 2, 2 * b), "kept_len": (0, L // 2, L - 1), "recent_len": (0, max(1, L // 8), L - 1)}


MAR_CACHED = register(StageSpec(
    name="mar_cached",
    label="cached mar step",
    runs="once per masked step with the token cache: encoder over the buffer and the recent tokens, decoder up to "
         "the cut layer's attention, and each position's change since the last step",
    inputs=_inputs,
    outputs=_outputs,
    wrapper=STAGE_NETWORKS["mar_cached"],
    axes=cache_axes,
    example=_example,
    flops=_flops,
    fp32_tails=("scores",),  # the choice of tokens reads the similarities
    varargs_from=4,
    optional=True,  # only lazy MAR steps with the token cache run it
))
