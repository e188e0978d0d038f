"""The pieces the stages' FLOP formulas are made of, at 2 FLOPs per multiply-add (`torch.utils.flop_counter`'s rule).

Counted: every matrix multiply and convolution; elementwise work, normalisations, softmax, gathers and
embeddings are not. With R rows, n tokens and width D:

  linear (n, a) -> (n, b)                           2 R n a b
  self-attention block part (qkv, q k^T, a v, proj) 8 R n D^2 + 4 R n^2 D
  cross-attention (q, proj over n; kv over m context tokens of width Dc; q k^T, a v)
                                                    4 R n D^2 + 4 R m Dc D + 4 R n m D
  ViT MLP with hidden Hm                            4 R n D Hm
  k x k convolution cin -> cout over P pixels       2 k^2 B P cin cout
  VAE spatial attention over P pixels, C channels   8 B P C^2 + 4 B P^2 C
"""
from __future__ import annotations


def linear(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def vit_block(rows: int, n: int, dim: int, hidden: int, context: int = 0, context_dim: int = 0) -> int:
    """timm block of `reference.mar.Block`: self-attention, optional cross-attention over `context` tokens, MLP."""
    flops = 8 * rows * n * dim * dim + 4 * rows * n * n * dim + 4 * rows * n * dim * hidden
    if context:
        flops += 4 * rows * n * dim * dim + 4 * rows * context * context_dim * dim + 4 * rows * n * context * dim
    return flops


def conv(batch: int, pixels: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * batch * pixels * kernel * kernel * c_in * c_out


def resnet_block(batch: int, pixels: int, c_in: int, c_out: int) -> int:
    shortcut = conv(batch, pixels, c_in, c_out, 1) if c_in != c_out else 0
    return conv(batch, pixels, c_in, c_out, 3) + conv(batch, pixels, c_out, c_out, 3) + shortcut


def spatial_attention(batch: int, pixels: int, c: int) -> int:
    return 4 * conv(batch, pixels, c, c, 1) + 4 * batch * pixels * pixels * c
