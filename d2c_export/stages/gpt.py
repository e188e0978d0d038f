"""The `gpt` stage: LlamaGen's class-conditional GPT, one prefill or decode step over a static KV cache."""
from __future__ import annotations

import torch
from torch import Tensor

from d2c_export.stages.flop_math import linear
from d2c_export.stages.spec import Shapes, Sizes, StageSpec, TensorSpec, register
from reference.gpt import cache_input_names
from reference.model import D2CConfig
from reference.pipeline import SamplingParams
from reference.stage_networks import GptStage


def _cache_spec(c: D2CConfig, name: str) -> TensorSpec:
    g = c.gpt
    return TensorSpec(name, torch.float32, ("rows", g.n_head, g.max_seq_len, g.head_dim))


def _new_spec(c: D2CConfig, name: str) -> TensorSpec:
    g = c.gpt
    return TensorSpec(name, torch.float32, (g.n_layer, "rows", g.n_head, "tokens", g.head_dim))


def _example(c: D2CConfig, s: Sizes, gen: torch.Generator) -> dict[str, Tensor]:
    g = c.gpt
    rows, tokens = s["rows"], s["tokens"]
    start = int(torch.randint(0, g.max_seq_len - tokens + 1, (1,), generator=gen))
    ids = torch.randint(0, g.vocab_size, (rows, tokens), generator=gen)
    if start == 0:
        ids[:, 0] = torch.randint(0, g.num_classes + 1, (rows,), generator=gen)
    shape = (rows, g.n_head, g.max_seq_len, g.head_dim)
    caches = {name: torch.randn(shape, generator=gen) for name in cache_input_names(g.n_layer)}
    return {"ids": ids, "input_pos": torch.arange(start, start + tokens), **caches}


def gpt_flops(config: D2CConfig, rows: int, tokens: int) -> int:
    """Per layer wqkv, wo, SwiGLU (3 matrices), scores and values over all S cache slots and the step's own keys;
    then the logits of every input token."""
    g = config.gpt
    d, s = g.dim, g.max_seq_len + tokens
    n = rows * tokens
    per_layer = linear(n, d, 3 * d) + linear(n, d, d) + 3 * linear(n, d, g.ffn_hidden) + 4 * rows * tokens * s * d
    return g.n_layer * per_layer + linear(n, d, g.vocab_size)


def _flops(config: D2CConfig, shapes: Shapes) -> int:
    rows, tokens = shapes["ids"]
    return gpt_flops(config, rows, tokens)


def _tuned(config: D2CConfig, max_batch: int) -> Sizes:
    """A decode step (one token; the prefill of the class token is one too) of a full batch, guided where the
    model's recommended sampling guides."""
    guided = SamplingParams(**SamplingParams.recommended_for(config)).discrete_cfg > 1.0
    return {"rows": (2 if guided else 1) * max_batch, "tokens": 1}


GPT = register(StageSpec(
    name="gpt",
    label="gpt decode step",
    runs="once per token: prefill of the class token, then one-token decode steps with the KV cache; the cache "
         "is an input only, the step's keys and values come out and the runtime writes them into it",
    inputs=lambda c: (TensorSpec("ids", torch.int64, ("rows", "tokens")),
                      TensorSpec("input_pos", torch.int64, ("tokens",)),
                      *(_cache_spec(c, name) for name in cache_input_names(c.gpt.n_layer))),
    outputs=lambda c: (TensorSpec("logits", torch.float32, ("rows", "tokens", c.gpt.vocab_size)),
                       _new_spec(c, "k_new"), _new_spec(c, "v_new")),
    wrapper=GptStage,
    axes=lambda c, b: {"rows": (1, 2, 2 * b), "tokens": (1, 2, c.gpt.max_seq_len)},
    example=_example,
    flops=_flops,
    tuned=_tuned,
    applies=lambda c: c.gpt is not None,
    fp32_heads=("logits",),  # sampling reads the logits: the output MatMul and what follows stay FP32
    cuda_graph=True,  # the same one-token shape for every decode step
    varargs_from=2,
))
