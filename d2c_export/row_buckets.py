"""Row buckets of captured denoising loops: a masked step's rows padded up to one of a few sizes.

A CUDA graph replays fixed shapes, and a masked step denoises batch x (tokens it predicts) rows, which a serving mix
of batch sizes spreads over many values (about 60 for d2c-b at batch 1..16 and 64 masked steps). Captured per exact
row count, the loops would outnumber any cache and be captured again and again. So a loop is captured for its row
count rounded up to a bucket (`row_bucket`: the count itself up to 4, then four sizes per octave, 5 6 7 8 10 12 14
16 20 ..., at most a quarter of padding), its feeds are placed in the first rows of each group of the bucket's
buffers (`place_rows`), and the real rows are the first rows of its result: 23 buckets cover d2c-b at batch 1..16.

Padding does not change the real rows. The diffusion head works row by row: every layer is a per-row linear map,
LayerNorm or AdaLN modulation, so row i of a result reads only row i of x, z and the noise (the guided rows too:
conditional rows first, unconditional rows at the bucket's offset, `guided_output` reads both by that offset). The
padding rows stay zero (finite), and whatever they compute is dropped. ONNX Runtime's CPU GEMM (MLAS) splits the
work over rows and columns but sums each output over its whole inner dimension in one fixed order, so the real
rows' bits do not depend on how many rows there are: checked by `tests/d2c_export/backends/test_row_buckets.py`
(d2c-tiny, and d2c-b's full diffusion head once by hand, every count up to 69 and some to 2049, both guidance
groups). MLAS takes another path for a single-row GEMM, which buckets never create from more rows (1 stays 1).
On a GPU, kernels may round another row count differently, as they do for another batch.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

EXACT_ROWS = 4  # row counts up to this are their own bucket
LOOP_CACHE = 64  # captured loops kept per cache: every bucket up to 65536 rows (max batch 256 x 256 tokens) fits


def row_bucket(rows: int) -> int:
    """`rows` rounded up to its bucket: itself up to EXACT_ROWS, then the next of four sizes per octave."""
    if rows <= EXACT_ROWS:
        return rows
    shift = rows.bit_length() - 3  # keep the top three bits: 4..7 times a power of two
    return -(-rows >> shift) << shift


def loop_rows(feeds: dict[str, Tensor]) -> tuple[int, int]:
    """(rows, groups) of a masked step's denoising feeds: noise (T + 1, N, C), z (G * N, Dz)."""
    rows = feeds["noise"].shape[1]
    return rows, feeds["z"].shape[0] // rows


def bucket_shapes(feeds: dict[str, Tensor], bucket: int) -> dict[str, tuple[int, ...]]:
    """The shape of each denoising feed with its rows padded to `bucket` (the step tables and scalars unchanged)."""
    rows, groups = loop_rows(feeds)
    shapes = {n: tuple(t.shape) for n, t in feeds.items()}
    shapes["noise"] = (shapes["noise"][0], bucket, *shapes["noise"][2:])
    shapes["z"] = (groups * bucket, *shapes["z"][1:])
    return shapes


def place_rows(copy: Callable[[Tensor, Tensor], None], padded: dict[str, Tensor], feeds: dict[str, Tensor]) -> None:
    """Copy `feeds` into the first rows of each group of `padded` (buffers of `bucket_shapes`), with `copy(dst, src)`;
    the padding rows are left as they are."""
    rows, groups = loop_rows(feeds)
    bucket = padded["noise"].shape[1]
    for name, t in feeds.items():
        if name == "noise":
            copy(padded[name][:, :rows], t)
        elif name == "z":
            for g in range(groups):  # conditional rows first, then the unconditional ones, each at its group's start
                copy(padded[name][g * bucket:g * bucket + rows], t[g * rows:(g + 1) * rows])
        else:
            copy(padded[name], t)
