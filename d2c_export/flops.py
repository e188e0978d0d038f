"""Analytic FLOP counts of one call of each stage, and the measured matmul roofline they are set against.

Counted: every matrix multiply and convolution, at 2 FLOPs per multiply-add (the convention of
`torch.utils.flop_counter`); elementwise work, normalisations, softmax, gathers and embeddings
are not counted. With R rows, n tokens and width D, the pieces are:

  linear (n, a) -> (n, b)                         2 R n a b
  self-attention block part (qkv, q k^T, a v, proj) 8 R n D^2 + 4 R n^2 D
  cross-attention (q, proj over n; kv over m context tokens of width Dc; q k^T, a v)
                                                  4 R n D^2 + 4 R m Dc D + 4 R n m D
  ViT MLP with hidden Hm                          4 R n D Hm
  3x3 convolution cin -> cout over P pixels       18 B P cin cout (1x1: 2 B P cin cout)
  VAE spatial attention over P pixels, C channels 8 B P C^2 + 4 B P^2 C

Per stage (see each function): `gpt` attends over the whole static cache (S slots) and its own T keys, projects
every input token to logits; `mar` projects all L tokens, encodes buffer + kept tokens, decodes
buffer + L tokens; `diffusion` runs the head on all G*N rows; `vae` is post_quant_conv + decoder.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from reference.diffusion_head import FREQ_EMBED_DIM
from reference.mar import Fusion, MARArgs
from reference.model import D2CConfig

Shapes = dict[str, Sequence[int]]
ROOFLINE_SIZE = 2048  # square fp32 matmul that sets the roofline
ROOFLINE_RUNS = 5  # best of this many timed products


def linear(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def vit_block(rows: int, n: int, dim: int, hidden: int, context: int = 0, context_dim: int = 0) -> int:
    """timm block of `reference.mar.Block`: self-attention, optional cross-attention over `context` tokens, MLP."""
    flops = 8 * rows * n * dim * dim + 4 * rows * n * n * dim + 4 * rows * n * dim * hidden
    if context:
        flops += 4 * rows * n * dim * dim + 4 * rows * context * context_dim * dim + 4 * rows * n * context * dim
    return flops


def _mlp_hidden(m: MARArgs, dim: int) -> int:
    return int(dim * m.mlp_ratio)


def gpt_flops(config: D2CConfig, rows: int, tokens: int) -> int:
    """LlamaGen step: per layer wqkv, wo, SwiGLU (3 matrices), scores and values over all S cache slots and the
    step's own `tokens` keys."""
    g = config.gpt
    d, s = g.dim, g.max_seq_len + tokens
    per_layer = linear(rows * tokens, d, 3 * d) + linear(rows * tokens, d, d) + 3 * linear(rows * tokens, d, g.ffn_hidden) \
        + 4 * rows * tokens * s * d
    return g.n_layer * per_layer + linear(rows * tokens, d, g.vocab_size)


def cond_flops(config: D2CConfig, rows: int) -> int:
    """Q-Former: `buffer_size` queries through blocks that cross-attend to the discrete tokens; else 0."""
    m = config.mar
    if m.fusion is not Fusion.QFORMER:
        return 0  # embedding + LayerNorm only
    d = m.encoder_embed_dim
    block = vit_block(rows, m.buffer_size, d, _mlp_hidden(m, d), context=m.discrete_len, context_dim=d)
    return m.qformer_depth * block


def mar_flops(config: D2CConfig, rows: int, kept_len: int) -> int:
    """z_proj over all L tokens, encoder over buffer + kept, decoder_embed, decoder over buffer + L."""
    m = config.mar
    de, dd = m.encoder_embed_dim, m.decoder_embed_dim
    cross = m.fusion is Fusion.CROSS_ATTN
    ctx = m.discrete_len if cross else 0
    n_enc, n_dec = m.buffer_size + kept_len, m.buffer_size + m.seq_len
    flops = linear(rows * m.seq_len, m.token_dim, de)
    flops += m.encoder_depth * vit_block(rows, n_enc, de, _mlp_hidden(m, de), ctx, de)
    flops += linear(rows * n_enc, de, dd)
    flops += m.decoder_depth * vit_block(rows, n_dec, dd, _mlp_hidden(m, dd), ctx, de)
    return flops


def diffusion_flops(config: D2CConfig, head_rows: int) -> int:
    """SimpleMLPAdaLN on G*N rows: input, time and condition embeddings, res blocks (MLP + AdaLN), final layer."""
    h = config.mar.head
    w = h.width
    flops = linear(head_rows, h.in_channels, w) + linear(head_rows, FREQ_EMBED_DIM, w) + linear(head_rows, w, w) \
        + linear(head_rows, h.z_channels, w)
    flops += h.depth * (2 * linear(head_rows, w, w) + linear(head_rows, w, 3 * w))
    return flops + linear(head_rows, w, 2 * w) + linear(head_rows, w, 2 * h.in_channels)


def _conv(batch: int, pixels: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * batch * pixels * kernel * kernel * c_in * c_out


def _resnet(batch: int, pixels: int, c_in: int, c_out: int) -> int:
    shortcut = _conv(batch, pixels, c_in, c_out, 1) if c_in != c_out else 0
    return _conv(batch, pixels, c_in, c_out, 3) + _conv(batch, pixels, c_out, c_out, 3) + shortcut


def _attn(batch: int, pixels: int, c: int) -> int:
    return 4 * _conv(batch, pixels, c, c, 1) + 4 * batch * pixels * pixels * c


def vae_flops(config: D2CConfig, batch: int, height: int, width: int) -> int:
    """post_quant_conv, then the LDM decoder (conv_in, mid, levels from the top down with up-sampling, conv_out)."""
    v = config.vae
    n, top = len(v.ch_mult), v.ch * v.ch_mult[-1]
    pixels = height * width
    flops = _conv(batch, pixels, v.embed_dim, v.embed_dim, 1) + _conv(batch, pixels, v.embed_dim, top, 3)
    flops += 2 * _resnet(batch, pixels, top, top) + _attn(batch, pixels, top)
    for i in reversed(range(n)):
        block_in = v.ch * v.ch_mult[i + 1] if i + 1 < n else top
        block_out = v.ch * v.ch_mult[i]
        attn = v.resolution // 2 ** i in v.decoder_attn_resolutions
        for _ in range(v.num_res_blocks + 1):
            flops += _resnet(batch, pixels, block_in, block_out) + (_attn(batch, pixels, block_out) if attn else 0)
            block_in = block_out
        if i != 0:
            pixels *= 4
            flops += _conv(batch, pixels, block_in, block_in, 3)
    return flops + _conv(batch, pixels, v.ch * v.ch_mult[0], v.out_ch, 3)


def stage_flops(config: D2CConfig, stage: str, shapes: Shapes) -> int:
    """FLOPs of one call of `stage` whose inputs have `shapes` (input name -> shape, as in `STAGES`)."""
    if stage == "gpt":
        rows, tokens = shapes["ids"]
        return gpt_flops(config, rows, tokens)
    if stage == "cond":
        return cond_flops(config, shapes["discrete_ids"][0])
    if stage == "mar":
        rows, kept_len = shapes["kept"]
        return mar_flops(config, rows, kept_len)
    if stage == "diffusion":
        return diffusion_flops(config, shapes["z"][0])
    if stage == "vae":
        batch, _, height, width = shapes["latents"]
        return vae_flops(config, batch, height, width)
    raise ValueError(f"no FLOP formula for stage {stage!r}")


# -- the roofline: achievable FLOP/s of a large matmul on a device -------------------------------------
def _matmul_graph(size: int) -> bytes:
    rng = np.random.default_rng(0)
    b = helper.make_tensor("b", TensorProto.FLOAT, (size, size), rng.standard_normal((size, size), np.float32).ravel())
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "roofline",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, (size, size))],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, (size, size))], [b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _best_seconds(fn, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_roofline(device: str, threads: int, with_ort: bool, size: int = ROOFLINE_SIZE,
                    runs: int = ROOFLINE_RUNS) -> dict[str, float]:
    """Achievable fp32 FLOP/s of a large square matmul on `device`: torch, ORT's MatMul, and their max."""
    flops = 2.0 * size ** 3
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {"torch": flops / _best_seconds(lambda: (torch.matmul(a, b), sync()), runs)}
    if with_ort:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(_matmul_graph(size), sess_options=opts, providers=providers)
        binding = session.io_binding()  # operands stay on the device: no host copies in the timing
        binding.bind_ortvalue_input("a", ort.OrtValue.ortvalue_from_numpy(a.cpu().numpy(), device, 0))
        binding.bind_output("c", device)
        out["ort"] = flops / _best_seconds(lambda: session.run_with_iobinding(binding), runs)
    out["peak"] = max(out.values())
    return out
