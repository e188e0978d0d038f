"""The mar step over cached features (LazyMAR's token cache), as two networks split at a cut layer of the decoder.

LazyMAR observes that most tokens' features barely change between adjacent masked steps. A cached step
recomputes only what changed and reads the rest from caches the loop keeps, indexed by sequence position
(S = buffer + L positions: the buffer slots, then the tokens):
- `MarCachedHead` (stage `mar_cached`): the encoder runs only the buffer and the `recent` tokens (those generated
  since the encoder last saw them), attending to the cached keys and values of every kept token; the decoder
  input takes the cached encoder features of the other kept tokens; decoder layers before the cut run in full,
  and the cut layer's attention too. It returns the hidden states after that attention, each position's cosine
  similarity of the cut layer's values to the cached ones (the loop picks the tokens to recompute from it), and
  the new cache rows.
- `MarCachedTail` (stage `mar_fresh`): the cut layer's MLP and every later layer run only the chosen tokens
  (the ones to predict first), attending to the cached keys and values of all positions; -> the conditions z of
  the tokens to predict and the new cache rows.
With every kept token recent and every position chosen, the two compute exactly the `mar` stage's conditions.
Models stay networks: the choice of tokens (sampling math) lives in `reference.samplers.TokenCache`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.mar import MAR, Attention, Block, Fusion


def cut_layer(depth: int) -> int:
    """The decoder layer after whose attention only the chosen tokens run: LazyMAR's 3 (MAR's decoders have 12 to
    20 layers), lower in shallow decoders so that one layer after it reads the cache where there are two."""
    return min(3, max(0, depth - 2))


def cached_layers(depth: int) -> int:
    """Decoder layers after the cut, whose keys and values the cache holds."""
    return depth - cut_layer(depth) - 1


def _rows_index(rows: Tensor, heads: int, head_dim: int) -> Tensor:
    return rows[:, None, :, None].expand(-1, heads, -1, head_dim)  # (R, H, n, hd)


def attend_cached(attn: Attention, x: Tensor, rows: Tensor, k_cache: Tensor, v_cache: Tensor,
                  bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Self-attention of the tokens `x` (R, n, D) at positions `rows` (R, n) over every position's keys and values:
    the cache's (R, H, S, hd), with these tokens' own written in. `bias` (R, 1, 1, S): -inf where a position is
    not attended. -> (output (R, n, D), their keys, their values (R, H, n, hd))."""
    q, k, v = (attn._heads(t) for t in attn.qkv(x).chunk(3, dim=-1))  # (R, H, n, hd)
    index = _rows_index(rows, attn.num_heads, attn.head_dim)
    keys, values = k_cache.to(k.dtype).scatter(2, index, k), v_cache.to(v.dtype).scatter(2, index, v)  # (R, H, S, hd)
    return attn.attend(q, keys, values, bias), k, v


def cached_block(block: Block, x: Tensor, rows: Tensor, k_cache: Tensor, v_cache: Tensor, bias: Tensor | None,
                 context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """`reference.mar.Block` on the tokens at `rows` with the other positions' keys and values from the cache."""
    out, k, v = attend_cached(block.attn, block.norm1(x), rows, k_cache, v_cache, bias)
    x = x + out
    if context is not None:
        x = x + block.cross_attn(block.norm_cross(x), context)
    return x + block.mlp(block.norm2(x)), k, v


class MarCachedHead(nn.Module):
    """The `mar_cached` stage: tokens (R, L, C); kept (R, K) sorted positions of the generated tokens; recent (R, Kr)
    those among them the encoder computes now; labels (R,); fusion; enc_cache (R, 2 * encoder_depth, H, S, hd) keys
    and values of every encoder layer by position; dec_in_cache (R, S, Dd) the decoder's embedded encoder features;
    cut_cache (R, H, S, hd) the cut layer's values of the last step.
    -> hidden (R, S, Dd) after the cut layer's attention, scores (R, S) cosine similarity of its values to
    `cut_cache` (mean over heads), enc_rows (R, 2 * encoder_depth, H, buffer + Kr, hd) and dec_rows
    (R, buffer + Kr, Dd) at the buffer and the recent positions, cut_values (R, H, S, hd).
    """

    def __init__(self, mar: MAR):
        super().__init__()
        self.mar = mar
        self.cut = cut_layer(mar.args.decoder_depth)

    def forward(self, tokens: Tensor, kept: Tensor, recent: Tensor, labels: Tensor, *rest: Tensor):
        m, a = self.mar, self.mar.args
        fusion, (enc_cache, dec_in_cache, cut_cache) = (None, rest) if a.fusion is Fusion.NONE else (rest[0], rest[1:])
        x = m.z_proj(tokens)  # (R, L, De)
        bsz, _, dim = x.shape
        buffer = m.class_embedding(labels).unsqueeze(1).expand(bsz, a.buffer_size, dim)
        if a.fusion is Fusion.QFORMER:
            buffer = buffer + fusion
        x = m.z_proj_ln(torch.cat([buffer, x], dim=1) + m.encoder_pos_embed_learned)  # (R, S, De)
        buf_idx = torch.arange(a.buffer_size, device=x.device).expand(bsz, -1)
        rows = torch.cat([buf_idx, recent + a.buffer_size], dim=1)  # (R, E) positions computed now
        seen = torch.cat([buf_idx, kept + a.buffer_size], dim=1)  # (R, buffer + K): buffer and kept positions
        allowed = torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device).scatter(1, seen, 1) > 0  # (R, S)
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~allowed, float("-inf"))[:, None, None, :]
        context = fusion if a.fusion is Fusion.CROSS_ATTN else None
        h = x.gather(1, rows.unsqueeze(-1).expand(-1, -1, dim))  # (R, E, De)
        enc_rows = []
        for i, block in enumerate(m.encoder_blocks):
            h, k, v = cached_block(block, h, rows, enc_cache[:, 2 * i], enc_cache[:, 2 * i + 1], bias, context)
            enc_rows += [k, v]
        dec_rows = m.decoder_embed(m.encoder_norm(h))  # (R, E, Dd)
        dec_dim = dec_rows.shape[-1]
        dec_in = dec_in_cache.to(dec_rows.dtype).scatter(1, rows.unsqueeze(-1).expand(-1, -1, dec_dim), dec_rows)
        y = torch.where(allowed.unsqueeze(-1), dec_in, m.mask_token.to(dec_in.dtype)) + m.decoder_pos_embed_learned
        for block in m.decoder_blocks[:self.cut]:
            y = block(y, context)
        cut = m.decoder_blocks[self.cut]
        q, k, v = (cut.attn._heads(t) for t in cut.attn.qkv(cut.norm1(y)).chunk(3, dim=-1))  # (R, H, S, hd)
        y = y + cut.attn.attend(q, k, v)
        if context is not None:
            y = y + cut.cross_attn(cut.norm_cross(y), context)
        scores = F.cosine_similarity(v.float(), cut_cache.float(), dim=-1).mean(dim=1)  # (R, S)
        return y, scores, torch.stack(enc_rows, dim=1), dec_rows, v


class MarCachedTail(nn.Module):
    """The `mar_fresh` stage: hidden (R, S, Dd) from `mar_cached`; pred (R, P) token positions to predict; others
    (R, F') further sequence positions to recompute; fusion (cross-attention fusion only); dec_cache
    (R, 2 * cached_layers, H, S, hd) keys and values of the layers after the cut, by position (absent when there is
    no such layer). -> z (R, P, Dd), and dec_rows (R, 2 * cached_layers, H, P + F', hd) at the positions
    `cat(pred + buffer, others)`.
    """

    def __init__(self, mar: MAR):
        super().__init__()
        self.mar = mar
        self.cut = cut_layer(mar.args.decoder_depth)

    def forward(self, hidden: Tensor, pred: Tensor, others: Tensor, *rest: Tensor):
        m, a = self.mar, self.mar.args
        context = rest[0] if a.fusion is Fusion.CROSS_ATTN else None
        dec_cache = rest[-1] if cached_layers(a.decoder_depth) else None
        dim = hidden.shape[-1]
        rows = torch.cat([pred + a.buffer_size, others], dim=1)  # (R, P + F')
        h = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, dim))
        cut = m.decoder_blocks[self.cut]
        h = h + cut.mlp(cut.norm2(h))
        dec_rows = []
        for j, block in enumerate(m.decoder_blocks[self.cut + 1:]):
            h, k, v = cached_block(block, h, rows, dec_cache[:, 2 * j], dec_cache[:, 2 * j + 1], None, context)
            dec_rows += [k, v]
        positions = m.diffusion_pos_embed_learned.expand(h.shape[0], -1, -1)  # (R, L, Dd)
        z = m.decoder_norm(h[:, :pred.shape[1]]) + positions.gather(1, pred.unsqueeze(-1).expand(-1, -1, dim))
        return (z, torch.stack(dec_rows, dim=1)) if dec_rows else z
