"""LlamaGen class-conditional GPT (c2i) with a static, export-friendly KV cache that the caller owns."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of `k` that is >= `n`."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTArgs:
    """Constructor arguments of the class-conditional GPT (the official ModelArgs, c2i subset)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 16384
    block_size: int = 256  # number of image tokens (a square grid)
    num_classes: int = 1000
    cls_token_num: int = 1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    class_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTArgs.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_head != 0:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for the 2D rotary embedding")
        grid = math.isqrt(self.block_size)
        if grid * grid != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square number of tokens")
        if self.cls_token_num != 1:
            raise ValueError(f"the c2i GPT has exactly one class token, got cls_token_num={self.cls_token_num}")
        if not self.class_dropout_prob > 0:
            raise ValueError("class_dropout_prob must be > 0: the null-class row for CFG exists only then")
        if self.norm_eps <= 0 or self.rope_base <= 0:
            raise ValueError("norm_eps and rope_base must be positive")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def null_class(self) -> int:
        """Class id of the unconditional (CFG) embedding row."""
        return self.num_classes

    @property
    def max_seq_len(self) -> int:
        return self.cls_token_num + self.block_size

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size, computed exactly as the official FeedForward does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)


GPT_PRESETS: dict[str, GPTArgs] = {
    "gpt-tiny": GPTArgs(dim=32, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10, multiple_of=32),
    "gpt-b": GPTArgs(dim=768, n_layer=12, n_head=12),
    "gpt-l": GPTArgs(dim=1024, n_layer=24, n_head=16),
}


def precompute_rope_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> Tensor:
    """2D rotary table (cls_token_num + grid_size**2, head_dim // 2, 2) of (cos, sin); the class rows are ZERO.

    The first head_dim // 4 rotation pairs follow the row index, the rest the column index; token
    position cls_token_num + r * grid_size + c holds grid cell (r, c). Zero rows (cos = sin = 0) mean
    the class token's query and key are zero vectors, exactly as in the official code.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (hd/4,)
    t = torch.arange(grid_size, device=freqs.device)
    freqs = torch.outer(t, freqs)  # (G, hd/4)
    grid = torch.cat([
        freqs[:, None, :].expand(-1, grid_size, -1),  # row angle
        freqs[None, :, :].expand(grid_size, -1, -1),  # column angle
    ], dim=-1)  # (G, G, hd/2)
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # (G*G, hd/2, 2)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])  # (S, hd/2, 2)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by rope (T, hd/2, 2); math in float32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    r = rope.view(1, xs.size(1), 1, xs.size(3), 2)  # (1, T, 1, hd/2, 2)
    cos, sin = r[..., 0], r[..., 1]
    out = torch.stack([
        xs[..., 0] * cos - xs[..., 1] * sin,
        xs[..., 1] * cos + xs[..., 0] * sin,
    ], dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(3).type_as(x)  # (B, T, H, hd)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (official order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        hidden = args.ffn_hidden
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def write_cache(cache: Tensor, new: Tensor, input_pos: Tensor) -> None:
    """Write new (L, B, H, T, hd) into cache (L, B, H, S, hd) at slots input_pos (T,), in place, on the cache's device."""
    cache.index_copy_(3, input_pos.to(device=cache.device, dtype=torch.long), new.to(cache.device, cache.dtype))


def empty_cache(args: GPTArgs, rows: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Zero k_cache, v_cache of shape (n_layer, rows, n_head, max_seq_len, head_dim)."""
    shape = (args.n_layer, rows, args.n_head, args.max_seq_len, args.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def cache_input_names(n_layer: int) -> list[str]:
    """Names of the per-layer cache inputs of a gpt step: k_cache_0 .. k_cache_{L-1}, then v_cache_0 .. v_cache_{L-1}."""
    return [f"{kv}_cache_{i}" for kv in "kv" for i in range(n_layer)]


def cache_feeds(k_cache: Tensor, v_cache: Tensor) -> dict[str, Tensor]:
    """The layers of stacked caches (L, B, H, S, hd) as named step inputs: views, no copy."""
    return dict(zip(cache_input_names(k_cache.shape[0]), [*k_cache.unbind(0), *v_cache.unbind(0)]))


def attention_masks(input_pos: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Which keys the queries at input_pos (T,) see: cache slots (T, S) and this call's own keys (T, T), bool.

    A query at position p sees every key at a position <= p: the cache slots up to p, except those this
    call rewrites (their keys are this call's own), and this call's keys at positions <= p.
    """
    s = torch.arange(slots, device=input_pos.device, dtype=input_pos.dtype)  # (S,)
    rewritten = (s[:, None] == input_pos[None, :]).any(dim=-1)  # (S,)
    cache_mask = (s[None, :] <= input_pos[:, None]) & ~rewritten[None, :]  # (T, S)
    new_mask = input_pos[None, :] <= input_pos[:, None]  # (T, T)
    return cache_mask, new_mask


class Attention(nn.Module):
    """Multi-head self-attention with fused wqkv, 2D RoPE, over a read-only static KV cache and the new keys."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        self.dim, self.n_head, self.head_dim = args.dim, args.n_head, args.head_dim
        self.wqkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, masks: tuple[Tensor, Tensor],
                k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D), rope (T, hd/2, 2), masks from `attention_masks`; caches (B, H, S, hd) -> (out, k, v).

        k, v (B, H, T, hd) are this call's keys and values; the caller writes them into the cache.
        """
        B, T, _ = x.shape
        S = k_cache.shape[2]
        q, k, v = self.wqkv(x).split([self.dim, self.dim, self.dim], dim=-1)  # 3 x (B, T, D)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rope(k.view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

        scores = torch.cat([torch.matmul(q, k_cache.to(q.dtype).transpose(-1, -2)),  # (B, H, T, S)
                            torch.matmul(q, k.transpose(-1, -2))], dim=-1).float()  # (B, H, T, S + T)
        scores = scores * (1.0 / math.sqrt(self.head_dim))
        mask = torch.cat(masks, dim=-1)  # (T, S + T)
        scores = torch.where(mask[None, None], scores, torch.full_like(scores, float("-inf")))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)  # (B, H, T, S + T)
        out = torch.matmul(probs[..., :S], v_cache.to(q.dtype)) + torch.matmul(probs[..., S:], v)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.dim)  # (B, T, D)
        return self.wo(out), k, v


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, masks: tuple[Tensor, Tensor],
                k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attention(self.attention_norm(x), rope, masks, k_cache, v_cache)
        h = x + a  # (B, T, D)
        return h + self.feed_forward(self.ffn_norm(h)), k, v


class LabelEmbedder(nn.Module):
    """Class embedding table with num_classes + 1 rows; the last row is the null class (CFG)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class GPT(nn.Module):
    """LlamaGen c2i Transformer; state_dict keys and shapes equal the official ones."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        self.args = args
        self.cls_embedding = LabelEmbedder(args.num_classes, args.dim)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        rope = precompute_rope_2d(args.grid_size, args.head_dim, args.rope_base, args.cls_token_num)
        self.register_buffer("freqs_cis", rope, persistent=False)  # (S, hd/2, 2)

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """`empty_cache` of this model's size, on its device unless `device` says otherwise."""
        return empty_cache(self.args, batch, dtype, self.output.weight.device if device is None else device)

    def embed(self, ids: Tensor, input_pos: Tensor) -> Tensor:
        """ids (B, T) at positions input_pos (T,): class ids where pos < cls_token_num, else image tokens."""
        a = self.args
        is_cls = (input_pos < a.cls_token_num)[None, :, None]  # (1, T, 1)
        cls = self.cls_embedding(ids.clamp(min=0, max=a.num_classes))  # (B, T, D)
        tok = self.tok_embeddings(ids.clamp(min=0, max=a.vocab_size - 1))  # (B, T, D)
        return torch.where(is_cls, cls, tok)  # (B, T, D)

    def forward(self, ids: Tensor, input_pos: Tensor, k_cache: Tensor | Sequence[Tensor],
                v_cache: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """One cached step: ids (B, T), input_pos (T,), caches (L, B, H, S, hd) -> logits (B, T, V) fp32, k, v.

        The caches are read, never written: k, v (L, B, H, T, hd) are this step's keys and values, for the
        caller to write at input_pos (`write_cache`; `step` does both). The query at position p attends to
        the keys at positions <= p. A cache may also be a sequence of L per-layer (B, H, S, hd) tensors.
        """
        h = self.embed(ids, input_pos)  # (B, T, D)
        rope = self.freqs_cis[input_pos]  # (T, hd/2, 2)
        masks = attention_masks(input_pos, k_cache[0].shape[-2])
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            h, k_i, v_i = layer(h, rope, masks, k_cache[i], v_cache[i])
            new_k.append(k_i)
            new_v.append(v_i)
        logits = self.output(self.norm(h)).float()  # (B, T, V)
        return logits, torch.stack(new_k), torch.stack(new_v)  # (L, B, H, T, hd) each

    def step(self, ids: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """`forward`, then its keys and values written into the caches in place; returns the logits."""
        logits, k, v = self.forward(ids, input_pos, k_cache, v_cache)
        write_cache(k_cache, k, input_pos)
        write_cache(v_cache, v, input_pos)
        return logits

    def forward_train(self, tokens: Tensor, class_ids: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) for tokens (B, T<=block_size) and class_ids (B,).

        The input is [class token, tokens[:, :-1]]; logits[:, t] predicts tokens[:, t].
        """
        ids = torch.cat([class_ids[:, None].to(tokens.dtype), tokens[:, :-1]], dim=1)  # (B, T)
        input_pos = torch.arange(ids.shape[1], device=ids.device)  # (T,)
        k_cache, v_cache = self.empty_cache(ids.shape[0], dtype=self.output.weight.dtype, device=ids.device)
        return self.forward(ids, input_pos, k_cache, v_cache)[0]  # (B, T, V)
