"""The `mar` stage: one masked autoregressive step, encoder over the kept tokens, decoder -> conditions z."""
from __future__ import annotations

import torch
from torch import Tensor

from d2c_export.stages.cond import cond_width
from d2c_export.stages.flop_math import linear, vit_block
from d2c_export.stages.spec import Shapes, Sizes, StageSpec, TensorSpec, register
from reference.mar import Fusion
from reference.model import D2CConfig
from reference.stage_networks import MarStage


def _inputs(c: D2CConfig) -> tuple[TensorSpec, ...]:
    m = c.mar
    specs = (TensorSpec("tokens", torch.float32, ("rows", m.seq_len, m.token_dim)),
             TensorSpec("kept", torch.int64, ("rows", "kept_len")),
             TensorSpec("pred", torch.int64, ("rows", "pred_len")),
             TensorSpec("labels", torch.int64, ("rows",)))
    if m.fusion is Fusion.NONE:
        return specs
    return specs + (TensorSpec("fusion", torch.float32, ("rows", cond_width(c), m.encoder_embed_dim)),)


def _example(c: D2CConfig, s: Sizes, gen: torch.Generator) -> dict[str, Tensor]:
    m = c.mar
    rows, kept_len, pred_len = s["rows"], s["kept_len"], s["pred_len"]
    if kept_len + pred_len > m.seq_len:
        raise ValueError(f"kept_len + pred_len must be <= {m.seq_len}")
    order = torch.stack([torch.randperm(m.seq_len, generator=gen) for _ in range(rows)])
    feeds = {"tokens": torch.randn(rows, m.seq_len, m.token_dim, generator=gen),
             "kept": order[:, :kept_len].sort(-1).values, "pred": order[:, kept_len:kept_len + pred_len].sort(-1).values,
             "labels": torch.randint(0, m.class_num + 1, (rows,), generator=gen)}
    if m.fusion is not Fusion.NONE:
        feeds["fusion"] = torch.randn(rows, cond_width(c), m.encoder_embed_dim, generator=gen)
    return feeds


def mar_flops(config: D2CConfig, rows: int, kept_len: int) -> int:
    """z_proj over all L tokens, encoder over buffer + kept, decoder_embed, decoder over buffer + L."""
    m = config.mar
    de, dd = m.encoder_embed_dim, m.decoder_embed_dim
    ctx = m.discrete_len if m.fusion is Fusion.CROSS_ATTN else 0
    n_enc, n_dec = m.buffer_size + kept_len, m.buffer_size + m.seq_len
    flops = linear(rows * m.seq_len, m.token_dim, de)
    flops += m.encoder_depth * vit_block(rows, n_enc, de, int(de * m.mlp_ratio), ctx, de)
    flops += linear(rows * n_enc, de, dd)
    flops += m.decoder_depth * vit_block(rows, n_dec, dd, int(dd * m.mlp_ratio), ctx, de)
    return flops


def _flops(config: D2CConfig, shapes: Shapes) -> int:
    rows, kept_len = shapes["kept"]
    return mar_flops(config, rows, kept_len)


MAR = register(StageSpec(
    name="mar",
    label="mar step",
    runs="once per masked step: encoder over the kept tokens, decoder -> conditions of the tokens to predict",
    inputs=_inputs,
    outputs=lambda c: (TensorSpec("z", torch.float32, ("rows", "pred_len", c.mar.decoder_embed_dim)),),
    wrapper=MarStage,
    axes=lambda c, b: {"rows": (1, 2, 2 * b), "kept_len": (0, c.mar.seq_len // 2, c.mar.seq_len - 1),
                       "pred_len": (1, max(2, c.mar.seq_len // 8), c.mar.seq_len)},
    example=_example,
    flops=_flops,
))
